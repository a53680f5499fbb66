"""The tuning search space in one place: defaults scaled to the base settings, overridden from a JSON or YAML file
(--tune-space): an entry replaces the default of its field, null drops it, a plain value fixes it."""
import json

from config import config_fields
from utils.checks import check_field
from utils.config_file import check_names, coerce, read_mapping
from utils.helpers import PipelineError

KINDS = ("float", "int", "categorical", "fixed")


FEATURE_STAGES = ["-1", "2", "2,-1"]
NOT_TUNED = {"selection": "trials keep their weights by swa: a rule that picks the epoch on the validation patients "
                          "would inflate the very score that compares trials"}


def default_space(cfg):
    """Ranges around the base settings; epoch counts stay below --epochs."""
    epochs = cfg.epochs
    space = dict(
        lr=dict(type="float", low=cfg.lr / 5, high=cfg.lr * 5, log=True),
        weight_decay=dict(type="float", low=1e-3, high=0.3, log=True),
        drop_rate=dict(type="float", low=0.0, high=0.5),
        focal_gamma=dict(type="float", low=0.0, high=3.0),
        tuples_per_patient=dict(type="int", low=max(2, cfg.tuples_per_patient // 2), high=2 * cfg.tuples_per_patient,
                                log=True),
        warmup_epochs=dict(type="int", low=0, high=max(1, epochs // 4)),
        frozen_epochs=dict(type="int", low=0, high=epochs // 2),
        feature_stage=dict(type="categorical", choices=FEATURE_STAGES),
    )
    if cfg.pretrained or cfg.pretrained_path:
        space["backbone_lr_scale"] = dict(type="float", low=0.03, high=1.0, log=True)
    if cfg.freeze_backbone:
        space.pop("frozen_epochs")
    return space


def load_space(cfg):
    """The default space with the entries of --tune-space applied, every entry checked."""
    space = default_space(cfg)
    if cfg.tune_space:
        space = apply_file(space, read_mapping(cfg.tune_space, "--tune-space"), cfg.tune_space)
    for name, spec in space.items():
        check_spec(name, spec, cfg.tune_space or "default space")
    if not any(spec["type"] != "fixed" for spec in space.values()):
        raise PipelineError(f"--tune-space {cfg.tune_space}: nothing left to tune; give at least one range or choice")
    return space


def apply_file(space, entries, path):
    check_names(list(entries), path, "--tune-space")
    for name in set(entries) & set(NOT_TUNED):
        raise PipelineError(f"--tune-space {path}: {name} cannot be tuned ({NOT_TUNED[name]}).")
    space = dict(space)
    for name, entry in entries.items():
        if entry is None:
            space.pop(name, None)
        elif isinstance(entry, dict):
            space[name] = dict(entry)
        else:
            space[name] = dict(type="fixed", value=entry)
    return space


def bad(where, name, problem):
    raise PipelineError(f"--tune-space {where}: {name}: {problem}. An entry is {{type: float|int, low, high, log}}, "
                        f"{{type: categorical, choices: [...]}}, a plain value (fixed) or null (not tuned).")


def as_choice(value):
    """Optuna choices are scalars: a list (several feature stages) becomes its comma text."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def check_spec(name, spec, where):
    kind = spec.get("type")
    if kind not in KINDS:
        bad(where, name, f"type {kind!r} is not one of {', '.join(KINDS[:3])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            bad(where, name, "categorical needs a non-empty list of choices")
        spec["choices"] = values = [as_choice(c) for c in choices]
    elif kind == "fixed":
        values = [spec["value"]]
    else:
        values = check_range(name, spec, where)
    for value in values:
        try:
            check_field(name, coerce(name, value))
        except PipelineError as e:
            bad(where, name, f"value {value!r} is not a valid setting ({e})")


def check_range(name, spec, where):
    low, high = spec.get("low"), spec.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers or low > high:
        bad(where, name, f"needs numbers low <= high, got low={low!r} high={high!r}")
    if spec["type"] == "int" and not all(float(v).is_integer() for v in (low, high)):
        bad(where, name, "an int range needs whole numbers")
    if spec.get("log") and (low <= 0 or spec.get("step") not in (None, 1)):
        bad(where, name, "a log range needs low > 0 and no step")
    field = config_fields()[name].default
    if spec["type"] == "float" and isinstance(field, int) and not isinstance(field, bool):
        bad(where, name, "is a whole-number field; use type int")
    return [low, high]


def draw(trial, name, spec):
    """One value of one entry from an Optuna trial (or a FixedTrial replaying a finished one)."""
    kind = spec["type"]
    if kind == "fixed":
        return spec["value"]
    if kind == "categorical":
        return trial.suggest_categorical(name, spec["choices"])
    log = bool(spec.get("log", False))
    if kind == "int":
        return trial.suggest_int(name, int(spec["low"]), int(spec["high"]), step=int(spec.get("step") or 1), log=log)
    return trial.suggest_float(name, float(spec["low"]), float(spec["high"]), step=spec.get("step"), log=log)


def suggest(trial, space):
    """{Config field: value} of one trial, every value as its field's type."""
    return {name: coerce(name, draw(trial, name, spec)) for name, spec in space.items()}


def space_key(space):
    return json.dumps(space, sort_keys=True, default=str)
