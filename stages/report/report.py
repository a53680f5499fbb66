"""Report stage: every table, paper table and plot rebuilt from output/runs, and the one page that shows them."""
from stages.report.efficiency import efficiency_table
from stages.report.page import write_page
from stages.report.plots import write_plots
from stages.training.runs import REFERENCE, magnification_runs, table_runs
from utils import plottings as plots
from utils import scoring
from utils.helpers import PipelineError, log, plots_dir, runs_dir, tables_dir, write_text
from stages.report.paper import write_paper
from stages.report.altered_inputs import robustness_plot
from stages.report.triage import triage_plot
from stages.report.registry import TABLE_NAMES, build_tables, paper_tables
from utils.tables import Book, write_table

TRAINING_STAGES = "cv,fixed,baselines,ablations"


def write_notes(cfg, notes):
    text = "\n".join(notes) + "\n" if notes else "every expected run was found\n"
    write_text(tables_dir(cfg) / "report_notes.txt", text)
    for note in notes:
        log(f"note: {note}")


def book_of(cfg, runs):
    listed = {table: table_runs(cfg, table) for table in ("ablation", "baseline")}
    by_mag = {m: magnification_runs(cfg, m) for m in cfg.magnifications}
    return Book(runs, REFERENCE, listed, by_mag, cfg.bootstrap, cfg.seed, rule=cfg.threshold_rule)


def run_report(cfg):
    """Stage: every table and plot from the run folders, without retraining; paper tables and report.html."""
    runs = scoring.load_runs(runs_dir(cfg))
    if not runs:
        raise PipelineError(f"no finished runs under {runs_dir(cfg)}. "
                            f"Train first: python main.py --stages {TRAINING_STAGES}")
    plots.setup_style()
    book = book_of(cfg, runs)
    log(f"Runs found: {', '.join(f'{name} ({len(splits)} splits)' for name, splits in runs.items())}")
    efficiency = efficiency_table(cfg, runs, book.notes)
    tables = build_tables(cfg, book, efficiency)
    tables = {key: write_table(cfg, TABLE_NAMES[key], table) for key, table in tables.items()}
    paper = paper_tables(tables, book, cfg.synthetic)
    written = write_paper(tables_dir(cfg) / "paper", paper)
    book.notes += [f"paper {key}: no rows (its runs are missing)." for key in paper if key not in written]
    write_plots(cfg, book)
    triage_plot(cfg, book, tables["triage"])
    robustness_plot(cfg, tables["robustness"])
    write_notes(cfg, book.notes)
    page = write_page(cfg, book, tables, paper)
    log(f"Tables -> {tables_dir(cfg)} (paper: {tables_dir(cfg) / 'paper'}), plots -> {plots_dir(cfg)}, page -> {page}")
