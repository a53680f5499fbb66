"""MMNet on BreakHis: runs the pipeline stages in order, or any subset with --stages."""
import argparse
import difflib
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from backbones.encoders import frozen_stage, is_cnn, open_encoder
from config import Config, config_fields, demo_overrides, list_kind
from preprocess.analyze import run_analyze
from preprocess.preprocess import run_split
from preprocess.synthetic import make_synthetic
from stages.inference.explain import run_explain
from stages.inference.export import run_export
from stages.inference.predict import run_predict
from stages.training.robustness import run_robustness
from stages.planning.plan import show_plan
from stages.report.report import run_report
from stages.training.distill import run_distill
from stages.training.protocol import run_protocol
from stages.training.schedule import all_ok, close_distributed, close_pools, init_distributed, rank, world_size
from stages.training.runs import check_run_names
from stages.training.stage import check_units, finish_stage, run_training
from stages.tuning.tune import finish_tune, run_tune
from utils.checks import RULES, check_config
from utils.config_file import read_config_file
from utils.env import environment, seed_everything
from utils.helpers import PipelineError, log, output_path, setup_logging, write_json, write_text

STAGES = {
    "analyze": run_analyze,
    "split": run_split,
    "tune": run_tune,
    "cv": partial(run_training, stage="cv"),
    "fixed": partial(run_training, stage="fixed"),
    "baselines": partial(run_training, stage="baselines"),
    "ablations": partial(run_training, stage="ablations"),
    "robustness": run_robustness,
    "protocol": run_protocol,
    "distill": run_distill,
    "export": run_export,
    "explain": run_explain,
    "report": run_report,
    "predict": run_predict,
}
DEFAULT = ("analyze", "split", "cv", "fixed", "baselines", "ablations", "robustness", "explain", "report")
TRAINING = ("cv", "fixed", "baselines", "ablations")
EVERY_RANK = TRAINING + ("tune",)
DEMO_ROOT = "data/synthetic"


def main(argv=None):
    """Settings, the check that no run would be reused under other settings, the output folder, then the stages."""
    setup_logging()
    try:
        cfg = resolve_config(argv)
        if cfg.plan:
            return plan_command(cfg)
        check_units(cfg, stage_list(cfg))
        start(cfg)
        write_times(cfg, run_stages(cfg))
    except PipelineError as e:
        log(f"ERROR: {e}")
        return 2
    except StageFailed:
        return 2
    except KeyboardInterrupt:
        log("Interrupted. Finished runs are kept; continue with the same command plus --resume.")
        return 130
    finally:
        close_pools()
        close_distributed()
    return 0


def plan_command(cfg):
    """--plan: the data and its first stages (analyze, split: timed, they are the command's own), then the plan of
    the rest; nothing trains."""
    start(cfg)
    measured = {}
    for name in [s for s in stage_list(cfg) if s in ("analyze", "split")]:
        begin = time.time()
        run_stage(name, cfg)
        measured[name] = time.time() - begin
    show_plan(cfg, stage_list(cfg), measured)
    return 0


def resolve_config(argv=None):
    """Config from the defaults, --demo's CPU-sized settings, a --config file and the flags (in that order), the two
    logged rewrites of pretrained encoders trained frozen, then every field checked."""
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    loaded = read_config_file(args.pop("config")) if "config" in args else {}
    cfg = Config()
    if args.get("demo", loaded.get("demo")):
        cfg = replace(cfg, data_root=DEMO_ROOT, **demo_overrides())
    given = {**loaded, **args}
    cfg = replace(cfg, **given)
    cfg = frozen_encoder(cfg, given)
    cfg = frozen_cnn_stage(cfg, given)
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(unknown)}. Valid stages, in order: {', '.join(STAGES)}")
    check_run_names(cfg)
    return check_config(cfg, list(STAGES))


def frozen_encoder(cfg, args):
    """An open pathology encoder trains frozen unless the command line asks to train it (LP-FT, fine-tuning, TTA)."""
    known = open_encoder(cfg.backbone)
    if known is None or cfg.freeze_backbone or {"freeze_backbone", "frozen_epochs", "tta"} & set(args):
        return cfg
    log(f"backbone {cfg.backbone} is a pathology foundation encoder (licence {known['licence']}, see its model "
        f"card): it trains frozen on cached features (--freeze-backbone). Pass --no-freeze-backbone to fine-tune it, "
        f"or --frozen-epochs N to fine-tune after N frozen epochs.")
    return replace(cfg, freeze_backbone=True)


def frozen_cnn_stage(cfg, args):
    """A pretrained CNN trained frozen reads a middle stage unless --feature-stage is given: its last stage transfers
    worst from ImageNet to histology (docs/encoders.md, "Which mode to use")."""
    pretrained = cfg.pretrained or cfg.pretrained_path
    if "feature_stage" in args or not (cfg.freeze_backbone and pretrained) or not is_cnn(cfg.backbone):
        return cfg
    stage = frozen_stage(cfg.backbone)
    stages = ",".join(map(str, stage))
    log(f"backbone {cfg.backbone} is a pretrained CNN trained frozen: its models read stage {stages} "
        f"(--feature-stage {stages}; pass --feature-stage -1 for the last stage)")
    return replace(cfg, feature_stage=stage)


def build_parser():
    parser = Parser(description=__doc__, allow_abbrev=False, epilog=f"Stages, in order: {', '.join(DEFAULT)}. "
                    "--demo runs them all on synthetic data with CPU-sized settings. On request: "
                    "--stages predict --input PATH scores new patients; --stages tune searches the training settings; "
                    "--stages distill trains a smaller student; --stages export writes ONNX; --stages protocol,report "
                    "adds table 9, what an image-level split would have claimed.")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON or YAML of config fields (e.g. output/tuning/best_config.json or output/config.json); "
                             "flags given beside it override it")
    for f in config_fields().values():
        add_flag(parser, f)
    return parser


def add_flag(parser, f):
    """--field-name for a Config field: its help line, what it accepts (utils/checks.py) and its default."""
    flag = "--" + f.name.replace("_", "-")
    default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    accepts = "" if isinstance(f.default, bool) or RULES[f.name].choices else f"; {RULES[f.name].allowed}"
    text = f"{f.metadata['help']}{accepts}; default: {default if default != '' else 'none'}"
    common = dict(default=None, help=text.replace("%", "%%"))
    if isinstance(f.default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        return
    kind = parse_list(list_kind(f.name)) if isinstance(f.default, tuple) else type(f.default)
    parser.add_argument(flag, type=kind, metavar=metavar(f.name, f.default), **common)


def metavar(name, default):
    """How a flag's value is shown in --help: its choices, PATH, N (a whole number) or X (a number)."""
    if RULES[name].choices:
        return "{" + ",".join(RULES[name].choices) + "}"
    if RULES[name].metavar:
        return RULES[name].metavar
    if isinstance(default, tuple):
        return "A,B"
    if name.endswith(("_root", "_dir", "_path", "checkpoint", "_space")):
        return "PATH"
    return {int: "N", float: "X"}.get(type(default), "TEXT")


def parse_list(kind):
    def parse(text):
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    return parse


class Parser(argparse.ArgumentParser):
    def error(self, message):
        known = [a for action in self._actions for a in action.option_strings]
        hint = ""
        for word in message.split():
            close = difflib.get_close_matches(word.strip("'\","), known, n=1)
            hint = f" Did you mean {close[0]}?" if close else hint
        self.exit(2, f"{self.prog}: error: {message}.{hint}\nValid flags: {' '.join(sorted(known))}\n")


def start(cfg):
    """Output folder, log file, config.json and the demo data, written once (rank 0) before any stage."""
    check_writable(cfg)
    init_distributed()
    name = "pipeline.log" if rank() == 0 else f"pipeline.rank{rank()}.log"
    setup_logging(output_path(cfg, "logs", name), console=rank() == 0)
    env = environment()
    if rank() == 0:
        write_json(output_path(cfg, "config.json"), dict(synthetic_data=cfg.synthetic, config=asdict(cfg), environment=env))
        banner(cfg, env)
        prepare_demo(cfg)
    if not all_ok(True):
        raise PipelineError("the torchrun ranks could not start together")


def check_writable(cfg):
    path = Path(cfg.output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"cannot write to the output directory {path.resolve()} ({e.strerror}). "
                            f"Choose another with --output-dir PATH.") from None


def banner(cfg, env):
    log("=" * 72)
    log(f"MMNet pipeline | data: {cfg.data_root} | output: {cfg.output_dir} | device: {env['device']} {env['gpu'] or ''}")
    log(f"MMNet on {cfg.backbone} (pretrained={cfg.pretrained}) | image {cfg.image_size} | seed {cfg.seed}")
    if cfg.synthetic:
        log("SYNTHETIC DATA: every number below comes from generated images, not from BreakHis.")
    log("=" * 72)


def prepare_demo(cfg):
    if not cfg.demo or Path(cfg.data_root).exists():
        return
    log(f"Generating the synthetic BreakHis tree under {cfg.data_root} ...")
    make_synthetic(cfg.data_root, preset="demo", seed=cfg.seed)


def stage_list(cfg):
    """The stages named by --stages in pipeline order; else predict alone with --input, the whole pipeline without."""
    if not cfg.stages and cfg.input:
        return ["predict"]
    return [s for s in STAGES if s in cfg.stages] or list(DEFAULT)


def run_stages(cfg):
    times = []
    for name in stage_list(cfg):
        log(f"\n>>> stage: {name}")
        seed_everything(cfg.seed)
        start = time.time()
        if not all_ok(stage_ok(name, cfg)):
            raise StageFailed(name)
        if name in EVERY_RANK and rank() == 0 and world_size() > 1:
            finish(cfg, name)
        times.append((name, time.time() - start))
    return times


def stage_ok(name, cfg):
    try:
        run_stage(name, cfg)
    except PipelineError as e:
        log(f"ERROR: {e}" if rank() == 0 else f"ERROR on rank {rank()}: {e}")
        return False
    return True


def run_stage(name, cfg):
    """Training and tuning run on every torchrun rank (each its share of the runs or trials); the others on rank 0."""
    if name not in EVERY_RANK and rank() != 0:
        return
    STAGES[name](cfg)


class StageFailed(Exception):
    """A stage stopped with a message already shown (on this rank or another)."""


def finish(cfg, name):
    """Under torchrun, once every rank is done: the stage's summary (tables, tuning outputs) on rank 0."""
    if name == "tune":
        finish_tune(cfg)
        return
    finish_stage(cfg, name)


def write_times(cfg, times):
    if rank() != 0:
        return
    log("\nStage wall time")
    for name, seconds in times:
        log(f"  {name:<10} {seconds:8.1f} s")
    log(f"  {'total':<10} {sum(s for _, s in times):8.1f} s")
    lines = ["stage,seconds"] + [f"{n},{s:.2f}" for n, s in times]
    write_text(output_path(cfg, "logs", "stage_times.csv"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
