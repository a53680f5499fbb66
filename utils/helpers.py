"""Paths, logging, atomic writes, the one error type the pipeline shows to users, and how numbers and names read."""
import json
import logging
import math
import os
import secrets
import sys
from pathlib import Path

logger = logging.getLogger("pipeline")


class PipelineError(Exception):
    """A problem the user can fix; main.py prints the message and exits with code 2."""


def log(msg=""):
    logger.info(msg)


def warn(msg):
    logger.warning(f"WARNING: {msg}")


def setup_logging(log_file=None, console=True):
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if console:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(stream)
    if log_file is None:
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)


def output_path(cfg, *parts):
    return Path(cfg.output_dir).joinpath(*parts)


def index_path(cfg):
    return output_path(cfg, "index.csv")


def tables_dir(cfg):
    return output_path(cfg, "tables")


def plots_dir(cfg):
    return output_path(cfg, "plots")


def splits_dir(cfg):
    return output_path(cfg, "splits")


def split_path(cfg, name):
    """name is 'fold_0'..'fold_4' or 'fixed'."""
    return splits_dir(cfg) / f"{name}.csv"


def runs_dir(cfg):
    return output_path(cfg, "runs")


def run_dir(cfg, model_name, split_name):
    return runs_dir(cfg) / model_name / split_name


class RunFiles:
    """The files of one run folder (run_dir); a run counts as finished only once its metrics.json is written."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.metrics = self.folder / "metrics.json"
        self.predictions = self.folder / "predictions.csv"
        self.history = self.folder / "history.csv"
        self.record = self.folder / "record.json"
        self.log = self.folder / "run.log"
        self.robustness = self.folder / "robustness.csv"
        self.oof = self.folder / "oof.csv"
        self.checkpoints = self.folder / "checkpoints"
        self.best = self.checkpoints / "best.pth"
        self.last = self.checkpoints / "last.pth"


def models_dir(cfg):
    return output_path(cfg, "models")


def require(path, stage):
    """Stop with a message naming the stage that writes `path` when it is missing."""
    if Path(path).exists():
        return Path(path)
    raise PipelineError(f"{path} is missing. Run the '{stage}' stage first: python main.py --stages {stage}")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=str))


def read_json(path):
    return json.loads(Path(path).read_text())


def write_atomic(path, write, binary=False):
    """Write through a temp file in the same folder, fsync, then os.replace: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") if binary else open(tmp, "x", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder):
    """Make a rename durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text):
    write_atomic(path, lambda f: f.write(text))


def write_bytes(path, data):
    write_atomic(path, lambda f: f.write(data), binary=True)


def write_csv(frame, path, **kwargs):
    write_atomic(path, lambda f: frame.to_csv(f, **kwargs))


def read_json_or_none(path):
    """The parsed file, or None when it is missing or damaged (a run counts as finished only when its marker parses)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_finite(value):
    """True for a finite real number (a NaN, an infinity, None or text is not)."""
    try:
        return math.isfinite(value)
    except TypeError:
        return False


def num(value, digits=3, sign=False):
    """A number as text with `digits` decimals (and its sign), n/a when it is not finite."""
    if not is_finite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def mean_std(mean, std, digits=3):
    """'0.912 ± 0.034'; the mean alone without a finite std (one fold); n/a without a finite mean."""
    if not is_finite(mean) or not is_finite(std):
        return num(mean, digits)
    return f"{num(mean, digits)} ± {num(std, digits)}"


def size_text(n_bytes):
    """A size as people read it: '1.3 GB', or '240.5 MB' under 1 GB."""
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def safe_name(text, keep="-_."):
    """Text as a file name: letters, digits and `keep` stay, anything else becomes '_'."""
    return "".join(c if c.isalnum() or c in keep else "_" for c in str(text))
