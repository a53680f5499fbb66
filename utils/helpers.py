"""Paths, logging and the one error type the pipeline shows to users."""
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("mmnet")


class PipelineError(Exception):
    """A problem the user can fix; main.py prints the message and exits with code 2."""


def log(msg=""):
    logger.info(msg)


def warn(msg):
    logger.warning(f"WARNING: {msg}")


def setup_logging(log_file=None):
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(stream)
    if log_file is None:
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)


def out(cfg, *parts):
    return Path(cfg.output_dir).joinpath(*parts)


def index_path(cfg):
    return out(cfg, "index.csv")


def tables_dir(cfg):
    return out(cfg, "tables")


def plots_dir(cfg):
    return out(cfg, "plots")


def splits_dir(cfg):
    return out(cfg, "splits")


def split_path(cfg, name):
    """name is 'fold_0'..'fold_4' or 'fixed'."""
    return splits_dir(cfg) / f"{name}.csv"


def runs_dir(cfg):
    return out(cfg, "runs")


def run_dir(cfg, model_name, split_name):
    return runs_dir(cfg) / model_name / split_name


def models_dir(cfg):
    return out(cfg, "models")


def require(path, stage):
    """Stop with a message naming the stage that writes `path` when it is missing."""
    if Path(path).exists():
        return Path(path)
    raise PipelineError(f"{path} is missing. Run the '{stage}' stage first: python main.py --stages {stage}")


def write_json(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))


def read_json(path):
    return json.loads(Path(path).read_text())
