"""Paper tables from the wide result tables: a handful of columns, `0.912 ± 0.034` or `0.912 [0.871, 0.948]`, the best
value per column in bold, a caption with the protocol; written as Markdown and booktabs LaTeX."""
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from utils.helpers import write_text

RULE_TEXT = {"val_youden": "Youden's J on the validation patients", "val_sens95":
             "sensitivity >= 0.95 on the validation patients", "fixed_0.5": "0.5"}
METRICS = [("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced acc."), ("f1", "F1"), ("auc", "AUC")]
MAGNIFICATION_COLUMNS = ["model", "level", "accuracy_mean", "accuracy_std", "auc_mean", "auc_std", "cmf_weight_mean",
                         "cmf_weight_std", "cmf_rank"]
LATEX = {"±": r"$\pm$", "Δ": r"$\Delta$", ">=": r"$\geq$", "—": "---"}


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


def num(value, digits=3, sign=False):
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def mean_std(mean, std, digits=3):
    if not np.isfinite(std):
        return num(mean, digits)
    return f"{num(mean, digits)} ± {num(std, digits)}"


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


def level_row(frame, level, **match):
    rows = frame[frame["level"] == level]
    for col, value in match.items():
        rows = rows[rows[col] == value]
    return rows.iloc[0] if len(rows) else None


def protocol(n_folds, n_patients, rule):
    folds = f"patient-wise {n_folds}-fold cross-validation" if n_folds > 1 else "the fixed patient-wise split"
    return f"{folds}, {n_patients} test patients; threshold: {RULE_TEXT.get(rule, rule)}"


def cv_paper(cv, rule, synthetic=False):
    table = cv[cv["threshold_rule"] == rule] if len(cv) else cv
    if table.empty:
        return None
    folds = [s for s in dict.fromkeys(table["split"]) if str(s).startswith("fold_")]
    pooled = level_row(table, "patient", split="pooled")
    n = int(pooled["n_patients"]) if pooled is not None else int(table["n_patients"].max())
    out = PaperTable("table_1", "Table 1", f"MMNet, {protocol(len(folds), n, rule)}. Per fold; mean ± std over the "
                     f"folds; all folds' test patients pooled with the 95 % bootstrap CI over patients."
                     f"{' SYNTHETIC DATA.' if synthetic else ''}",
                     ["Split", "Patients"] + [t for _, t in METRICS] + ["Tuple AUC"])
    rows = []
    for split in folds:
        p, t = level_row(table, "patient", split=split), level_row(table, "tuple", split=split)
        rows.append(([split.replace("_", " "), count(p["n_patients"])] + [num(float(p[m])) for m, _ in METRICS] +
                     [num(float(t["auc"]))], {}))
    mean, std = level_row(table, "patient", split="mean"), level_row(table, "patient", split="std")
    tmean, tstd = level_row(table, "tuple", split="mean"), level_row(table, "tuple", split="std")
    if mean is not None and len(folds) > 1:
        rows.append((["mean ± std", ""] + [mean_std(float(mean[m]), float(std[m])) for m, _ in METRICS] +
                     [mean_std(float(tmean["auc"]), float(tstd["auc"]))], {}))
    if pooled is not None and len(folds) > 1:
        tp = level_row(table, "tuple", split="pooled")
        rows.append((["pooled [95 % CI]", count(pooled["n_patients"])] +
                     [with_ci(*(float(pooled[c]) for c in (m, f"{m}_ci_low", f"{m}_ci_high"))) for m, _ in METRICS] +
                     [with_ci(float(tp["auc"]), float(tp["auc_ci_low"]), float(tp["auc_ci_high"]))], {}))
    return assemble(out, rows)


def fixed_paper(fixed, rule, synthetic=False):
    table = fixed[fixed["threshold_rule"] == rule] if len(fixed) else fixed
    if table.empty:
        return None
    models = list(dict.fromkeys(table["model"]))
    n = int(table["n_patients"].max())
    out = PaperTable("table_2", "Table 2", f"The fixed patient-wise 70/15/15 split, {n} test patients; threshold: "
                     f"{RULE_TEXT.get(rule, rule)}; 95 % bootstrap CI over patients."
                     f"{' SYNTHETIC DATA.' if synthetic else ''}",
                     ["Model", "Patients"] + [t for _, t in METRICS] + ["Tuple AUC"])
    rows = []
    for name in models:
        p, t = level_row(table, "patient", model=name), level_row(table, "tuple", model=name)
        if p is None or t is None:
            continue
        cells = [name, count(p["n_patients"])]
        cells += [with_ci(*(float(p[c]) for c in (m, f"{m}_ci_low", f"{m}_ci_high"))) for m, _ in METRICS]
        cells.append(with_ci(float(t["auc"]), float(t["auc_ci_low"]), float(t["auc_ci_high"])))
        values = {title: (float(p[m]), True) for m, title in METRICS}
        values["Tuple AUC"] = (float(t["auc"]), True)
        rows.append((cells, values))
    return assemble(out, rows) if rows else None


def comparison_paper(table, reference, key, title, what, synthetic=False, speed=False):
    """Tables 3 and 4: each model's fold mean ± std, the reference minus it with the paired CI, DeLong and McNemar."""
    if table.empty:
        return None
    rule = table["threshold_rule"].iloc[0]
    ref = level_row(table, "patient", model=reference)
    n = int(ref["n_patients"]) if ref is not None else int(table["n_patients"].max())
    n_folds = int(ref["n_folds"]) if ref is not None else int(table["n_folds"].max())
    columns = ["Model", "Patients"] + [t for _, t in METRICS] + ["Tuple AUC", "ΔAUC [95 % CI]",
                                                                 "p DeLong (patient / tuple)", "p McNemar",
                                                                 "Params (M)", "MACs (G)"] + (["ms / patient"] if speed else [])
    out = PaperTable(key, title, f"{what} against {reference} on the same test patients, {protocol(n_folds, n, rule)}. "
                     f"Mean ± std over the folds each model shares with {reference}; ΔAUC = {reference} minus the "
                     f"model (patient level, paired bootstrap 95 % CI); DeLong's test on the pooled test patients and "
                     f"on the tuples (tuples of a patient are not independent: read the patient value); McNemar's "
                     f"test of the patient decisions.{' SYNTHETIC DATA.' if synthetic else ''}", columns)
    rows = []
    for name in dict.fromkeys(table["model"]):
        p, t = level_row(table, "patient", model=name), level_row(table, "tuple", model=name)
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


def magnification_paper(table, synthetic=False):
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
                     "for that magnification (mean ± std over its test tuples, rank 1 = largest)."
                     f"{' SYNTHETIC DATA.' if synthetic else ''}",
                     ["Magnification", "Model", "Accuracy", "AUC", "Tuple AUC", "CMF weight", "CMF rank"])
    return assemble(out, rows)


def paper_tables(tables, reference, rule, synthetic=False):
    """Tables 1-5 in paper form; a table without rows is None."""
    return {
        "table_1": cv_paper(tables["cv"], rule, synthetic),
        "table_2": fixed_paper(tables["fixed"], rule, synthetic),
        "table_3": comparison_paper(tables["ablation"], reference, "table_3", "Table 3", "Ablations of MMNet",
                                    synthetic),
        "table_4": comparison_paper(tables["baseline"], reference, "table_4", "Table 4", "Baselines", synthetic,
                                    speed=True),
        "table_5": magnification_paper(tables["magnification"], synthetic),
    }


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
