"""The one list of runs: every model the pipeline trains, the stage that trains it and the tables that show it."""
from dataclasses import dataclass, field

from backbones import REFERENCE_MODEL, LinearProbe
from backbones.encoders import frozen_stage
from preprocess.tuples import ANY
from utils.helpers import PipelineError

REFERENCE = REFERENCE_MODEL
LINEAR_PROBE = LinearProbe.name
MEMBERS = f"{REFERENCE}_fixed_member"
PARTS = ("spatial", "channel", "hma", "cmf")
STUDENT = f"{REFERENCE}_student"
TEACHER = f"{STUDENT}_teacher"


@dataclass(frozen=True)
class RunSpec:
    """One run name under output/runs/, the registry model it builds, the model flags it changes and the settings it
    trains with instead of the command's (the student's image size)."""
    name: str
    model: str
    stage: str
    flags: dict = field(default_factory=dict, hash=False, compare=False)
    tables: tuple = ()
    mag: str = ""
    members: bool = False
    settings: dict = field(default_factory=dict, hash=False, compare=False)


def reference_runs():
    """The reference on the CV folds and the fixed split, and table 2's ensemble members on the member splits."""
    return [RunSpec(REFERENCE, REFERENCE, "cv", tables=("cv",)), RunSpec(REFERENCE, REFERENCE, "fixed", tables=("fixed",)),
            RunSpec(MEMBERS, REFERENCE, "fixed", members=True)]


def any_mag_run(cfg):
    """The magnification-independent classifier: one backbone and head on single fields of every magnification, a
    patient scored by the mean over all its fields; it sees as many fields per step and per epoch as MMNet."""
    n = len(cfg.magnifications)
    settings = dict(batch_size=cfg.batch_size * n, tuples_per_patient=cfg.tuples_per_patient * n)
    return RunSpec("any_mag", "single_mag", "baselines", {"magnifications": (ANY,)}, ("baseline",), settings=settings)


def baseline_runs(cfg):
    runs = [RunSpec("simple_concat", "simple_concat", "baselines", tables=("baseline", "ablation"))]
    runs += [RunSpec(f"single_{m}", "single_mag", "baselines", {"magnifications": (m,)}, ("baseline", "magnification"),
                     m) for m in cfg.magnifications]
    runs.append(any_mag_run(cfg))
    mag = cfg.magnifications[0]
    flags = {"magnifications": (mag,), "backbone": cfg.resnet_backbone}
    runs.append(RunSpec(f"resnet50_transfer_{mag}", "resnet50_transfer", "baselines", flags, ("baseline",), mag))
    probe = {"feature_stage": cfg.feature_stage if cfg.freeze_backbone else frozen_stage(cfg.backbone)}
    return runs + [RunSpec(LINEAR_PROBE, LINEAR_PROBE, "baselines", probe, tables=("baseline",))]


def ablation_runs(cfg):
    """MMNet without each part; on each magnification alone (one field) and fed four fields of it (as many fields
    per decision as MMNet, one magnification)."""
    runs = [RunSpec(f"{REFERENCE}_no_{part}", REFERENCE, "ablations", {f"use_{part}": False}, ("ablation",))
            for part in PARTS]
    n = len(cfg.magnifications)
    for m in cfg.magnifications:
        runs.append(RunSpec(f"{REFERENCE}_only_{m}", REFERENCE, "ablations", {"magnifications": (m,)},
                            ("ablation", "magnification"), m))
        runs.append(RunSpec(f"{REFERENCE}_fields_{m}", REFERENCE, "ablations", {"magnifications": (m,) * n},
                            ("ablation", "magnification"), m))
    return runs


def distill_runs(cfg):
    """The distilled student (lighter backbone, smaller embedding and images) and its teacher scored alike."""
    flags = {"backbone": cfg.student_backbone, "embed_dim": cfg.student_embed_dim}
    settings = dict(image_size=cfg.student_image_size, freeze_backbone=False, frozen_epochs=0,
                    distill_temperature=cfg.distill_temperature, distill_weight=cfg.distill_weight)
    return [RunSpec(STUDENT, REFERENCE, "distill", flags, ("baseline",), settings=settings),
            RunSpec(TEACHER, REFERENCE, "distill", tables=("baseline",))]


def all_runs(cfg):
    return reference_runs() + baseline_runs(cfg) + ablation_runs(cfg) + distill_runs(cfg)


def stage_runs(cfg, stage):
    """The stage's runs, or those of them named by --runs."""
    return [r for r in all_runs(cfg) if r.stage == stage and (not cfg.runs or r.name in cfg.runs)]


def check_run_names(cfg):
    names = list(dict.fromkeys(r.name for r in all_runs(cfg)))
    unknown = [n for n in cfg.runs if n not in names]
    if unknown:
        raise PipelineError(f"--runs: unknown run name(s) {', '.join(unknown)}. Valid names: {', '.join(names)}")


def table_runs(cfg, table):
    """Run names a comparison table lists after the reference, in table order."""
    order = {"ablation": ablation_runs(cfg) + baseline_runs(cfg)[:1]}
    runs = order.get(table, all_runs(cfg))
    return list(dict.fromkeys(r.name for r in runs if table in r.tables))


def magnification_runs(cfg, mag):
    return [r.name for r in all_runs(cfg) if "magnification" in r.tables and r.mag == mag]
