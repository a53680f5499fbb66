"""Table 7: split-conformal patient-level prediction sets (crepes), calibrated on each split's validation patients,
and temperature scaling of the same probabilities with the ECE before and after."""
import numpy as np
import pandas as pd
from crepes import ConformalClassifier
from scipy.optimize import minimize_scalar

from stages.report.paper import PaperTable, assemble, count
from utils.helpers import PipelineError, num
from utils.metrics import expected_calibration_error
from utils.scoring import cv_splits, level_frame

EPS = 1e-6


def check_alphas(alphas):
    bad = [a for a in alphas if not (isinstance(a, (int, float)) and 0 < a < 1)]
    if bad or not alphas:
        raise PipelineError(f"--conformal-alpha {','.join(map(str, alphas))} is out of range: each level must be in "
                            "(0, 1), e.g. 0.05,0.1")


def scores(p):
    """Hinge nonconformity of each label, (benign, malignant): 1 - its probability."""
    p = np.asarray(p, dtype=float)
    return np.column_stack([p, 1 - p])


def mondrian_allowed(y, alpha):
    """Class-conditional sets need enough calibration patients of each class to ever leave that class out."""
    return all((np.asarray(y) == c).sum() >= np.ceil(1 / alpha) for c in (0, 1))


def prediction_sets(cal_y, cal_p, test_p, alpha):
    """(n_test, 2) 0/1 sets at 1 - alpha and 'mondrian' or 'marginal': class-conditional where the calibration
    patients allow it, else one pool of scores."""
    cal_y = np.asarray(cal_y).astype(int)
    alphas = scores(cal_p)[np.arange(len(cal_y)), cal_y]
    test = scores(test_p)
    if mondrian_allowed(cal_y, alpha):
        cc = ConformalClassifier().fit(alphas, bins=cal_y)
        sets = np.column_stack([cc.predict_set(test, bins=np.full(len(test), c), confidence=1 - alpha,
                                               smoothing=False)[:, c] for c in (0, 1)])
        return sets, "mondrian"
    cc = ConformalClassifier().fit(alphas)
    return cc.predict_set(test, confidence=1 - alpha, smoothing=False), "marginal"


def set_outcome(sets, y):
    """Coverage and the shares of single-label, both-label and empty sets; the error rate among single labels."""
    y = np.asarray(y).astype(int)
    size = sets.sum(1)
    single = size == 1
    wrong = single & (sets[np.arange(len(y)), y] == 0)
    return dict(n_test=len(y), coverage=float(sets[np.arange(len(y)), y].mean()), single=float(single.mean()),
                both=float((size == 2).mean()), empty=float((size == 0).mean()),
                single_error=float(wrong.sum() / single.sum()) if single.any() else np.nan)


def logit(p):
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def scaled(p, temperature):
    return 1 / (1 + np.exp(-logit(p) / temperature))


def fit_temperature(y, p):
    """The temperature minimising the negative log-likelihood of y under sigmoid(logit(p) / T)."""
    y, z = np.asarray(y, dtype=float), logit(p)

    def nll(log_t):
        q = np.clip(1 / (1 + np.exp(-z / np.exp(log_t))), EPS, 1 - EPS)
        return -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))
    return float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


def patients(run, role):
    frame = level_frame(run["pred"], "patient", role)
    return frame["label"].to_numpy().astype(int), frame["prob_malignant"].to_numpy(float)


def split_parts(run, alphas):
    """Per alpha: the calibration counts, the set outcome, and the sets with labels for pooling; or the reason."""
    (cal_y, cal_p), (test_y, test_p) = patients(run, "val"), patients(run, "test")
    base = dict(n_calibration=len(cal_y), n_cal_benign=int((cal_y == 0).sum()), n_cal_malignant=int(cal_y.sum()))
    if len(cal_y) == 0 or len(test_y) == 0:
        return base, "no validation patients" if len(cal_y) == 0 else "no test patients", {}, None
    temperature = fit_temperature(cal_y, cal_p) if len(np.unique(cal_y)) == 2 else np.nan
    calibrated = dict(temperature=temperature, ece_before=expected_calibration_error(test_y, test_p),
                      ece_after=expected_calibration_error(test_y, scaled(test_p, temperature))
                      if np.isfinite(temperature) else np.nan)
    sets = {a: prediction_sets(cal_y, cal_p, test_p, a) for a in alphas}
    return dict(base, **calibrated), "", sets, (test_y, test_p)


def conformal_table(book, alphas):
    """The reference's sets on each split and on the CV folds' test patients pooled, at each alpha."""
    check_alphas(alphas)
    splits = book.runs.get(book.reference, {})
    if not splits:
        book.notes.append(f"table 7: no {book.reference} run.")
        return pd.DataFrame()
    rows, pooled = [], {a: [] for a in alphas}
    for split in cv_splits(splits) + [s for s in splits if s == "fixed"]:
        base, why, sets, test = split_parts(splits[split], alphas)
        if why:
            book.notes.append(f"table 7: {book.reference} {split}: n/a, {why}.")
            rows += [dict(model=book.reference, split=split, alpha=a, **base, note=f"n/a: {why}") for a in alphas]
            continue
        for a, (s, method) in sets.items():
            rows.append(dict(model=book.reference, split=split, alpha=a, method=method, **base,
                             **set_outcome(s, test[0]), note=""))
            if split != "fixed":
                pooled[a].append((s, test, method, base))
    for a, parts in pooled.items():
        if len(parts) < 2:
            continue
        s = np.vstack([p[0] for p in parts])
        y, prob = np.concatenate([p[1][0] for p in parts]), np.concatenate([p[1][1] for p in parts])
        after = np.concatenate([scaled(p[1][1], p[3]["temperature"]) for p in parts])
        methods = sorted({p[2] for p in parts})
        rows.append(dict(model=book.reference, split="pooled_cv", alpha=a, method="/".join(methods),
                         n_calibration=sum(p[3]["n_calibration"] for p in parts),
                         n_cal_benign=sum(p[3]["n_cal_benign"] for p in parts),
                         n_cal_malignant=sum(p[3]["n_cal_malignant"] for p in parts),
                         ece_before=expected_calibration_error(y, prob),
                         ece_after=expected_calibration_error(y, after) if np.isfinite(after).all() else np.nan,
                         **set_outcome(s, y), note=f"{len(parts)} folds, each calibrated on its own patients"))
    return pd.DataFrame(rows)


def calibration_text(table):
    folds = table[table["split"].str.startswith("fold_")].drop_duplicates("split")
    parts = [f"{r['split'].replace('_', ' ')} {count(r['n_calibration'])} ({count(r['n_cal_benign'])} benign)"
             for r in folds.to_dict("records")]
    fixed = table[table["split"] == "fixed"]
    if len(fixed):
        parts.append(f"fixed split {count(fixed['n_calibration'].iloc[0])}")
    return "; ".join(parts)


def conformal_paper(table, end=""):
    if table.empty:
        return None
    rows = []
    for r in table.to_dict("records"):
        if str(r.get("note", "")).startswith("n/a"):
            rows.append(([r["split"].replace("_", " "), num(r["alpha"], 2), str(r["note"])] + [""] * 8, {}))
            continue
        ece = f"{num(r['ece_before'])} → {num(r['ece_after'])}"
        rows.append(([r["split"].replace("_", " "), num(r["alpha"], 2), r["method"], count(r["n_calibration"]),
                      count(r["n_test"]), num(r["coverage"]), num(r["single"]), num(r["both"]), num(r["empty"]),
                      num(r["single_error"]), ece], {}))
    smallest = int(table["n_calibration"].min())
    out = PaperTable("table_7", "Table 7", "MMNet's split-conformal prediction sets of patients (crepes; nonconformity "
                     "1 - the probability of a label; class-conditional (Mondrian) where each class has at least "
                     "1/alpha calibration patients, else one pool), calibrated on each split's validation patients and "
                     f"scored on its test patients. Calibration patients: {calibration_text(table)}. The guarantee "
                     "(coverage >= 1 - alpha) holds on average over calibration sets; with n calibration patients a "
                     "label can be left out only when 1/(n + 1) < alpha, so with "
                     f"{smallest} a set at alpha {1 / (smallest + 1):.2f} or below holds both labels, and the "
                     "coverage of one fold swings widely. Both labels: refer to a pathologist. Last column: test "
                     "ECE before and after temperature scaling fitted on the same validation patients."
                     f"{end}", ["Split", "Alpha", "Sets", "Calibration", "Test", "Coverage", "Single label",
                                "Both labels", "Empty", "Error (single)", "ECE before → after"])
    return assemble(out, rows)
