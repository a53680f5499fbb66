"""Paper tables from the wide result tables: a handful of columns, `0.912 ± 0.034` or `0.912 [0.871, 0.948]`, the best
value per column in bold, a caption with the protocol; written as Markdown and booktabs LaTeX."""
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from utils.helpers import mean_std, num, write_text

RULE_TEXT = {"fixed_0.5": "0.5",
             "val_youden": "Youden's J on the validation patients",
             "val_sens95": "sensitivity >= 0.95 on the validation patients",
             "oof_youden": "Youden's J on inner models' out-of-fold predictions over the train+val patients"}
LEVEL_TEXT = ("; a fitted threshold decides the units it was fitted on: patient rows at the one fitted on patients' "
              "mean probabilities, tuple rows at the one fitted on tuples")
METRICS = [("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced acc."), ("f1", "F1"), ("auc", "AUC")]
MAGNIFICATION_COLUMNS = ["model", "level", "accuracy_mean", "accuracy_std", "auc_mean", "auc_std", "cmf_weight_mean",
                         "cmf_weight_std", "cmf_rank"]
LATEX = {"±": r"$\pm$", "Δ": r"$\Delta$", ">=": r"$\geq$", "—": "---", "→": r"$\rightarrow$"}


@dataclass
class PaperTable:
    """One table as text cells, which of them are bold, and its caption."""
    key: str
    title: str
    caption: str
    columns: list
    rows: list = field(default_factory=list)
    bold: list = field(default_factory=list)

    def frame(self, mark=lambda text: text):
        cells = [[mark(c) if b else c for c, b in zip(row, bold)] for row, bold in zip(self.rows, self.bold)]
        return pd.DataFrame(cells, columns=self.columns)


def with_ci(value, low, high, sign=False):
    if not np.isfinite(low):
        return num(value, sign=sign)
    return f"{num(value, sign=sign)} [{num(low, sign=sign)}, {num(high, sign=sign)}]"


def p_text(p):
    if p is None or not np.isfinite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def count(value):
    return str(int(value)) if value is not None and np.isfinite(value) else ""


def best(values, higher=True):
    """True where a value is the column's best; nothing is bold with fewer than two values."""
    values = np.array([v if v is not None else np.nan for v in values], dtype=float)
    if np.isfinite(values).sum() < 2:
        return [False] * len(values)
    top = np.nanmax(values) if higher else np.nanmin(values)
    return [bool(np.isfinite(v) and abs(v - top) < 5e-4) for v in values]


def assemble(table, columns):
    """Fill a PaperTable from rows of (cells, {column: (value, higher_is_better)}) and bold each column's best."""
    table.rows = [cells for cells, _ in columns]
    table.bold = [[False] * len(table.columns) for _ in columns]
    for j, name in enumerate(table.columns):
        picked = [values.get(name) for _, values in columns]
        if not any(picked):
            continue
        higher = next(p[1] for p in picked if p)
        for i, flag in enumerate(best([p[0] if p else np.nan for p in picked], higher)):
            table.bold[i][j] = flag
    return table


def header(first):
    """Columns of tables 1 and 2: what a row is, its test patients, the patient metrics and the tuple AUC."""
    return [first, "Patients"] + [t for _, t in METRICS] + ["Tuple AUC"]


def ci_cell(row, metric):
    """'value [low, high]' of one metric of a wide-table row."""
    return with_ci(*(float(row[c]) for c in (metric, f"{metric}_ci_low", f"{metric}_ci_high")))


def both_levels(table, **match):
    """(patient row, tuple row) of one split or model of a wide table."""
    return level_row(table, "patient", **match), level_row(table, "tuple", **match)


def level_row(frame, level, **match):
    rows = frame[frame["level"] == level]
    for col, value in match.items():
        rows = rows[rows[col] == value]
    return rows.iloc[0] if len(rows) else None


def rules_text(table):
    """The threshold rule(s) of a table's rows in words, naming the models of each where they differ."""
    by_rule = table.groupby("threshold_rule", sort=False)["model"].unique() if "model" in table else None
    rules = list(dict.fromkeys(table["threshold_rule"]))
    fitted = LEVEL_TEXT if any(r != "fixed_0.5" for r in rules) else ""
    if len(rules) == 1:
        return f"threshold: {RULE_TEXT[rules[0]]}{fitted}"
    parts = [f"{RULE_TEXT[r]} for {', '.join(by_rule[r])}" for r in rules]
    return f"thresholds: {'; '.join(parts)}{fitted}"


def protocol(n_folds, n_patients, table, fixed=False):
    """The protocol in words: cross-validation folds (or the fixed split), test patients, threshold rule(s)."""
    folds = f"patient-wise {n_folds}-fold cross-validation" if n_folds > 1 else "one fold of patient-wise cross-validation"
    return f"{'the fixed patient-wise split' if fixed else folds}, {n_patients} test patients; {rules_text(table)}"


def tail(synthetic, differs, tuned):
    """The end of a caption: settings that differ between its rows, the tuning studies that chose them, and the
    synthetic-data stamp."""
    text = f" Settings differ between rows: {'; '.join(differs)}." if differs else ""
    text += (f" Training settings chosen by {', '.join(tuned)} on training and validation patients only (nested)."
             if tuned else "")
    return text + (" SYNTHETIC DATA." if synthetic else "")


def fold_cells(split, p, t):
    """Table 1's row of one fold: its test patients, the patient metrics and the tuple AUC."""
    return [split.replace("_", " "), count(p["n_patients"])] + [num(float(p[m])) for m, _ in METRICS] + [
        num(float(t["auc"]))], {}


def cv_paper(cv, rule, end=""):
    table = cv[cv["threshold_rule"] == rule] if len(cv) else cv
    if table.empty:
        return None
    folds = [s for s in dict.fromkeys(table["split"]) if str(s).startswith("fold_")]
    pooled = level_row(table, "patient", split="pooled")
    n = int(pooled["n_patients"]) if pooled is not None else int(table["n_patients"].max())
    caption = (f"MMNet, {protocol(len(folds), n, table)}. Per fold; mean ± std over the folds; all folds' test "
               f"patients pooled with the 95 % bootstrap CI over patients.{end}")
    rows = [fold_cells(split, *both_levels(table, split=split)) for split in folds]
    mean, std = level_row(table, "patient", split="mean"), level_row(table, "patient", split="std")
    tmean, tstd = level_row(table, "tuple", split="mean"), level_row(table, "tuple", split="std")
    if mean is not None and len(folds) > 1:
        rows.append((["mean ± std", ""] + [mean_std(float(mean[m]), float(std[m])) for m, _ in METRICS] +
                     [mean_std(float(tmean["auc"]), float(tstd["auc"]))], {}))
    if pooled is not None and len(folds) > 1:
        tp = level_row(table, "tuple", split="pooled")
        rows.append((["pooled [95 % CI]", count(pooled["n_patients"])] + [ci_cell(pooled, m) for m, _ in METRICS] +
                     [ci_cell(tp, "auc")], {}))
    return assemble(PaperTable("table_1", "Table 1", caption, header("Split")), rows)


def fixed_paper(fixed, rule, end=""):
    table = fixed[fixed["threshold_rule"] == rule] if len(fixed) else fixed
    if table.empty:
        return None
    models = list(dict.fromkeys(table["model"]))
    n = int(table["n_patients"].max())
    ensemble = " The ensemble's thresholds are the mean of its members', each fitted on validation patients that " \
        "member did not train on." if table["model"].str.endswith("_ensemble").any() else ""
    out = PaperTable("table_2", "Table 2", f"The fixed patient-wise 70/15/15 split, {n} test patients; "
                     f"{rules_text(table)}; 95 % bootstrap CI over patients.{ensemble}{end}",
                     header("Model"))
    rows = []
    for name in models:
        p, t = both_levels(table, model=name)
        if p is None or t is None:
            continue
        cells = [name, count(p["n_patients"])] + [ci_cell(p, m) for m, _ in METRICS] + [ci_cell(t, "auc")]
        values = {title: (float(p[m]), True) for m, title in METRICS}
        values["Tuple AUC"] = (float(t["auc"]), True)
        rows.append((cells, values))
    return assemble(out, rows) if rows else None


def comparison_paper(table, reference, key, title, what, end="", speed=False, protocol_name="cv"):
    """Tables 3 and 4: each model's fold mean ± std, the reference minus it with the paired CI, DeLong and McNemar;
    the models run on the fixed split only are a table of their own beside the reference on that split."""
    table = table[table["protocol"] == protocol_name] if len(table) else table
    if table.empty:
        return None
    ref = level_row(table, "patient", model=reference)
    n = int(ref["n_patients"]) if ref is not None else int(table["n_patients"].max())
    n_folds = int(ref["n_folds"]) if ref is not None else int(table["n_folds"].max())
    columns = ["Model", "Patients"] + [t for _, t in METRICS] + ["Tuple AUC", "ΔAUC [95 % CI]",
                                                                 "p DeLong (patient / tuple)", "p McNemar",
                                                                 "Params (M)", "MACs (G)"] + (["ms / patient"] if speed else [])
    spread = (f"Mean ± std over the folds each model shares with {reference}" if protocol_name == "cv" else
              "Values on the fixed split's test patients (no spread: one split)")
    setting = protocol(n_folds, n, table, protocol_name == "fixed")
    out = PaperTable(key, title, f"{what} against {reference} on the same test patients, {setting}. "
                     f"{spread}; ΔAUC = {reference} minus the model (patient level, paired bootstrap 95 % CI); "
                     f"DeLong's test on the pooled test patients and on the tuples where both models read the same "
                     f"images (tuples of a patient are not independent: read the patient value); McNemar's test of "
                     f"the patient decisions. A model that reads one magnification scores a patient by the mean over "
                     f"its distinct images of it.{end}", columns)
    rows = []
    for name in dict.fromkeys(table["model"]):
        p, t = both_levels(table, model=name)
        if p is None or t is None:
            continue
        cells = [name, count(p["n_patients"])]
        cells += [mean_std(float(p[f"{m}_mean"]), float(p[f"{m}_std"])) for m, _ in METRICS]
        cells.append(mean_std(float(t["auc_mean"]), float(t["auc_std"])))
        same = name == reference
        cells.append("—" if same else with_ci(*(float(p.get(c, np.nan)) for c in
                                               ("auc_diff", "auc_diff_ci_low", "auc_diff_ci_high")), sign=True))
        cells.append("—" if same else f"{p_text(p.get('delong_p'))} / {p_text(t.get('delong_p'))}")
        cells.append("—" if same else p_text(p.get("mcnemar_p")))
        cells += [num(float(p.get("params_m", np.nan)), 2), num(float(p.get("macs_g", np.nan)), 3)]
        values = {title: (float(p[f"{m}_mean"]), True) for m, title in METRICS}
        values.update({"Tuple AUC": (float(t["auc_mean"]), True), "Params (M)": (float(p.get("params_m", np.nan)), False),
                       "MACs (G)": (float(p.get("macs_g", np.nan)), False)})
        if speed:
            cells.append(num(float(p.get("ms_per_patient", np.nan)), 1))
            values["ms / patient"] = (float(p.get("ms_per_patient", np.nan)), False)
        rows.append((cells, values))
    return assemble(out, rows) if rows else None


def magnification_paper(table, end=""):
    if table.empty:
        return None
    table = table.reindex(columns=list(dict.fromkeys(list(table.columns) + MAGNIFICATION_COLUMNS)))
    rows = []
    for _, p in table[(table["level"] == "patient") | table["level"].isna()].iterrows():
        t = level_row(table, "tuple", model=p["model"]) if isinstance(p["model"], str) else None
        cells = [p["magnification"], p["model"] if isinstance(p["model"], str) else "— (not run)",
                 mean_std(float(p["accuracy_mean"]), float(p["accuracy_std"])),
                 mean_std(float(p["auc_mean"]), float(p["auc_std"])),
                 mean_std(float(t["auc_mean"]), float(t["auc_std"])) if t is not None else "n/a",
                 mean_std(float(p.get("cmf_weight_mean", np.nan)), float(p.get("cmf_weight_std", np.nan))),
                 count(p.get("cmf_rank", np.nan))]
        values = {"Accuracy": (float(p["accuracy_mean"]), True), "AUC": (float(p["auc_mean"]), True),
                  "Tuple AUC": (float(t["auc_mean"]) if t is not None else np.nan, True)}
        rows.append((cells, values))
    if not rows:
        return None
    out = PaperTable("table_5", "Table 5", "Each magnification alone (a single-magnification baseline and MMNet "
                     "restricted to it; patient level, mean ± std over the folds) beside MMNet's learned CMF weight "
                     "for that magnification (mean ± std over its test tuples, rank 1 = largest); each model scores a "
                     f"patient by the mean over its distinct images of that magnification.{end}",
                     ["Magnification", "Model", "Accuracy", "AUC", "Tuple AUC", "CMF weight", "CMF rank"])
    return assemble(out, rows)


def latex_text(text):
    for char, repl in (("\\", r"\textbackslash{}"), ("%", r"\%"), ("_", r"\_"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(char, repl)
    for char, repl in LATEX.items():
        text = text.replace(char, repl)
    return text


def to_latex(table):
    """booktabs LaTeX through pandas' Styler; bold cells by CSS, converted to \\bfseries."""
    frame = table.frame()
    css = pd.DataFrame([["font-weight: bold;" if b else "" for b in row] for row in table.bold],
                       index=frame.index, columns=frame.columns)
    styler = frame.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    styler = styler.apply(lambda _: css, axis=None)
    tex = styler.to_latex(hrules=True, caption=latex_text(table.caption), label=f"tab:{table.key}", position="t",
                          position_float="centering", column_format="l" * 2 + "r" * (len(table.columns) - 2),
                          convert_css=True)
    for char, repl in LATEX.items():
        tex = tex.replace(char, repl)
    return tex


def to_markdown(table):
    text = table.frame(lambda c: f"**{c}**").to_markdown(index=False, disable_numparse=True)
    return f"**{table.title}.** {table.caption}\n\n{text}\n"


def write_paper(folder, tables):
    """table_k.md and table_k.tex for every table that has rows; the names written."""
    written = []
    for key, table in tables.items():
        if table is None:
            continue
        write_text(folder / f"{key}.md", to_markdown(table))
        write_text(folder / f"{key}.tex", to_latex(table))
        written.append(key)
    return written
