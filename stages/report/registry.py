"""Every report table in one place: its file, how it is built, its paper form, its page title and figures, and the
stage that feeds it."""
from dataclasses import dataclass, field
from types import SimpleNamespace

from stages.report.compare import ablation_table, baseline_table
from stages.report.conformal import conformal_paper, conformal_table
from stages.report.inflation import protocol_paper, protocol_table
from stages.report.altered_inputs import robustness_paper, robustness_table
from stages.report.paper import comparison_paper, cv_paper, fixed_paper, magnification_paper, tail
from stages.report.triage import triage_paper, triage_table
from stages.training.runs import REFERENCE as REF
from utils.tables import cv_table, fixed_table, magnification_table, subtype_table


@dataclass(frozen=True)
class Table:
    """One table: `key` names its rows in `tables`, `source` the wide table a paper-only entry (4b) reads."""
    key: str
    file: str = ""
    build: object = None
    paper: object = None
    title: str = ""
    figures: list = field(default_factory=list)
    stage: str = ""
    label: str = ""
    source: str = ""

    @property
    def wide(self):
        return self.source or self.key


def curve(name, level):
    return f"plots/roc_curves/{REF}_{name}_{level}.png"


def fold_plot(folder, tag):
    """The pooled CV folds' plot, else fold 0's."""
    return [f"plots/{folder}/{REF}_pooled_cv_{tag}.png", f"plots/{folder}/{REF}_fold_0_{tag}.png"]


TABLES = [
    Table("cv", "table_1_cross_validation_k_fold_results.csv", lambda cfg, book, built: cv_table(book),
          lambda t, c: cv_paper(t["cv"], c.rule, c.end["table 1"]), "Table 1 · Cross-validation",
          [([curve("cv", "patient")], "ROC per fold, patient level"),
           (fold_plot("confusion_matrices", "binary_patient"), "Confusion matrix, patient level"),
           (fold_plot("calibration", "reliability_patient"), "Reliability diagram (ECE)"),
           (fold_plot("calibration", "confidence_patient"), "Confidence distribution"),
           ([f"plots/training_curves/{REF}.png"], "Training curves of every split")], "cv", "table 1"),
    Table("fixed", "table_2_patient_wise_results.csv", lambda cfg, book, built: fixed_table(book),
          lambda t, c: fixed_paper(t["fixed"], c.rule, c.end["table 2"]), "Table 2 · Fixed split",
          [([curve("fixed", "patient")], "ROC, fixed split, patient level"),
           ([f"plots/confusion_matrices/{REF}_fixed_binary_patient.png"], "Confusion matrix, patient level"),
           ([f"plots/calibration/{REF}_fixed_reliability_patient.png"], "Reliability diagram (ECE)")],
          "fixed", "table 2"),
    Table("ablation", "table_3_ablation_results.csv", lambda cfg, book, built: ablation_table(book, built["efficiency"]),
          lambda t, c: comparison_paper(t["ablation"], c.reference, "table_3", "Table 3", "Ablations of MMNet",
                                        c.end["table 3"]), "Table 3 · Ablations",
          [([curve("vs_ablations", "patient")], "Mean ROC against the ablations, patients"),
           ([curve("vs_ablations", "tuple")], "Mean ROC against the ablations, tuples")], "ablations", "table 3"),
    Table("baseline", "table_4_baseline_comparison.csv", lambda cfg, book, built: baseline_table(book, built["efficiency"]),
          lambda t, c: comparison_paper(t["baseline"], c.reference, "table_4", "Table 4", "Baselines",
                                        c.end["table 4"], speed=True), "Table 4 · Baselines",
          [([curve("vs_baselines", "patient")], "Mean ROC against the baselines, patients"),
           ([curve("vs_baselines", "tuple")], "Mean ROC against the baselines, tuples")], "baselines", "table 4"),
    Table("baseline_fixed", paper=lambda t, c: comparison_paper(
              t["baseline"], c.reference, "table_4b", "Table 4b", "Models trained on the fixed split (the distilled "
              "student and its teacher)", c.end["table 4"], speed=True, protocol_name="fixed"),
          title="Table 4b · Student and teacher, fixed split", stage="fixed,distill", label="table 4",
          source="baseline"),
    Table("magnification", "table_5_per_magnification_results.csv", lambda cfg, book, built: magnification_table(book),
          lambda t, c: magnification_paper(t["magnification"], c.end["table 5"]), "Table 5 · Per magnification",
          [([f"plots/magnification_importance/{REF}_pooled_cv.png", f"plots/magnification_importance/{REF}_fold_0.png"],
            "Learned magnification importance, CV test tuples"),
           (["plots/magnification_importance/best_model_fixed_test.png"], "Best model, fixed-split test tuples")],
          "baselines,ablations", "table 5"),
    Table("triage", "table_6_triage.csv", lambda cfg, book, built: triage_table(book),
          lambda t, c: triage_paper(t["triage"], c.end["table 6"]), "Table 6 · Triage",
          [(["plots/triage/workload_sensitivity.png"], "Share of patients cleared against sensitivity")],
          "cv,fixed,baselines", "table 6"),
    Table("conformal", "table_7_conformal.csv", lambda cfg, book, built: conformal_table(book, cfg.conformal_alpha),
          lambda t, c: conformal_paper(t["conformal"], c.end["table 7"]), "Table 7 · Conformal sets",
          [([f"plots/calibration/{REF}_pooled_cv_reliability_patient.png",
             f"plots/calibration/{REF}_fixed_reliability_patient.png"], "Reliability diagram before scaling")],
          "cv,fixed", "table 7"),
    Table("robustness", "table_8_robustness.csv", lambda cfg, book, built: robustness_table(book),
          lambda t, c: robustness_paper(t["robustness"], c.end["table 8"]), "Table 8 · Robustness",
          [(["plots/robustness/auc_change.png"], "Patient AUC change under each altered input")],
          "robustness", "table 8"),
    Table("protocol", "table_9_split_protocol.csv", lambda cfg, book, built: protocol_table(cfg, book),
          lambda t, c: protocol_paper(t["protocol"], c.end["table 9"]), "Table 9 · Protocol inflation", [],
          "protocol,report", "table 9"),
    Table("subtype", "table_subtype_per_class.csv", lambda cfg, book, built: subtype_table(book)),
    Table("efficiency", "table_efficiency.csv", lambda cfg, book, built: built["efficiency"]),
]
TABLE_NAMES = {t.key: t.file for t in TABLES if t.file}


def paper_key(table):
    """table_4b for 'Table 4b · ...': the paper file and the page section of a table."""
    return "table_" + table.title.split(" · ")[0].split()[1]


def build_tables(cfg, book, efficiency):
    """Every wide table, in registry order, from the loaded runs and the efficiency table."""
    built = {"efficiency": efficiency}
    for table in TABLES:
        if table.build is not None:
            built[table.key] = table.build(cfg, book, built)
    return {t.key: built[t.key] for t in TABLES if t.build is not None}


def paper_tables(tables, book, synthetic=False):
    """{table_k: PaperTable or None} of every entry with a paper form; captions end with the settings that differ
    between a table's rows, the tuning studies behind them and the synthetic-data stamp."""
    labels = {t.label for t in TABLES if t.label}
    end = {k: tail(synthetic, book.differs.get(k), book.tuned.get(k)) for k in labels}
    context = SimpleNamespace(rule=book.rule, reference=book.reference, end=end, book=book)
    return {paper_key(t): t.paper(tables, context) for t in TABLES if t.paper is not None}
