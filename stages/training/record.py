"""The run record, record.json in every run folder: the settings that shape the run's result (their values and a
digest), the data it read, the code commit, who trained it, and every patient whose data shaped a choice behind it,
each group named by where it came from (the run's own split, a tuning study, a teacher, ensemble members). Reuse of
finished runs, the leak guard and the report read it."""
import hashlib
import json
from dataclasses import replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import pandas as pd

from backbones import MODELS, magnifications_read
from config import of_kind
from preprocess.preprocess import load_split
from utils.config_file import STUDY_KEY, read_config_file
from utils.env import commit
from utils.helpers import PipelineError, RunFiles, index_path, read_json_or_none, run_dir, split_path, write_json
from utils.lock import me
from utils.scoring import union_seen

COMPUTE = of_kind("compute")
RUN_CONTROL = of_kind("control")
PER_RUN = of_kind("per_run")
SHAPING = of_kind("shaping")
ROLES = ("train", "val")


def plain(value):
    """A value as JSON holds it (tuples as lists, also inside dicts)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, (tuple, list)) else value


def shaping(cfg):
    """The settings that shape a run's result: the fields config.py gives kind shaping (not the compute ones, the run
    controls, or those that reach a run only through its RunSpec)."""
    return {k: plain(getattr(cfg, k)) for k in SHAPING}


def digest(values):
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tuned_settings(path):
    """(the tuned settings, the tuning block) of a best_config.json written by the tune stage."""
    block = (read_json_or_none(path) or {}).get(STUDY_KEY)
    if block is None:
        raise PipelineError(f"{path} is not a best_config.json of the tune stage (it has no '{STUDY_KEY}' block).")
    values = read_config_file(path)
    return {k: values[k] for k in block["tuned"]}, block


def fold_tuning(cfg, split):
    """CV fold `split`'s own best_config.json under --tuned-folds, else None."""
    if not cfg.tuned_folds or not split.startswith("fold_"):
        return None
    path = Path(cfg.tuned_folds) / split / "best_config.json"
    if not path.is_file():
        raise PipelineError(f"--tuned-folds {cfg.tuned_folds}: no {path}. Tune that fold first: python main.py "
                            f"--stages tune --tune-scope per_fold --folds {split.removeprefix('fold_')}")
    return path


def run_config(cfg, spec, split):
    """The settings one run trains with: the command's, a CV fold's own tuned ones (--tuned-folds), then the run's
    own (the student's image size, say)."""
    path = fold_tuning(cfg, split)
    if path is not None:
        cfg = replace(cfg, **tuned_settings(path)[0], tuning=str(path))
    return replace(cfg, **spec.settings)


@lru_cache(maxsize=64)
def data_key(index_file, split_file, stamps):
    """Digest of what a split gives its runs: every image's file name with its patient and the patient's role."""
    index = pd.read_csv(index_file, usecols=["patient_id", "file"], dtype=str, keep_default_na=False)
    split = pd.read_csv(split_file, usecols=["patient_id", "role"], dtype=str, keep_default_na=False)
    roles = dict(zip(split["patient_id"], split["role"]))
    lines = sorted(f"{roles.get(p, '')}|{p}|{f}" for p, f in zip(index["patient_id"], index["file"]))
    return digest(lines)


def data_digest(cfg, split):
    index, roles = index_path(cfg), split_path(cfg, split)
    if not index.exists() or not roles.exists():
        return ""
    return data_key(str(index), str(roles), (index.stat().st_mtime_ns, roles.stat().st_mtime_ns))


def expected(cfg, spec, split, run_cfg=None):
    """What a run of `spec` on `split` under `cfg` would record: its settings (`run_cfg`, built here unless given),
    model, flags and data."""
    run_cfg = run_config(cfg, spec, split) if run_cfg is None else run_cfg
    return dict(settings=shaping(run_cfg), model=spec.model, flags=plain(spec.flags), run_settings=plain(spec.settings),
                data=data_digest(cfg, split))


def own_source(cfg, spec, split):
    """The patients a run's own split gives it to train and validate on."""
    frame = load_split(cfg, split)
    return dict(name=f"{spec.name}/{split}", **{r: sorted(frame.loc[frame["role"] == r, "patient_id"]) for r in ROLES})


def tuning_source(run_cfg):
    """The tuning study a run inherited its settings from (--config best_config.json, --tuned-folds), or None."""
    if not run_cfg.tuning:
        return None
    _, block = tuned_settings(run_cfg.tuning)
    study = block["study"]
    return dict(name=f"tuning study {study} ({run_cfg.tuning})", study=study, **block["seen_patients"])


def inner_source(run_cfg, spec, own):
    """The inner models over a run's train+val patients (the linear probe's C; --threshold-rule oof_youden), which
    train and validate on each of them; None for a run without."""
    if not MODELS[spec.model].inner_models and (run_cfg.threshold_rule != "oof_youden" or spec.members):
        return None
    both = sorted(set(own["train"]) | set(own["val"]))
    return dict(name=f"the inner models of {own['name']}", train=both, val=both)


def sources_of(cfg, run_cfg, spec, split, extra=()):
    """Every group of patients behind a run (`run_cfg`: its settings, run_config): its split's train and val, its inner
    models, the tuning study, `extra` (a teacher)."""
    own = own_source(cfg, spec, split)
    found = [own, inner_source(run_cfg, spec, own), tuning_source(run_cfg)]
    return [s for s in found if s is not None] + list(extra)


def new_record(cfg, run_cfg, spec, split, model_kwargs, sources):
    """The record a run writes when it starts (so --resume and reuse know what it was trained under); `run_cfg` is its
    settings (run_config)."""
    values = expected(cfg, spec, split, run_cfg)
    return dict(run=spec.name, split=split, model_name=spec.model, model_kwargs=plain(model_kwargs),
                reads=list(magnifications_read(spec.model, model_kwargs)), digest=digest(values), **values,
                commit=commit(), trained_by=me(), started=datetime.now().isoformat(timespec="seconds"),
                compute={k: plain(getattr(run_cfg, k)) for k in COMPUTE}, data_root=str(Path(cfg.data_root).resolve()),
                tuning=run_cfg.tuning, seen_patients=union_seen(sources), sources=sources)


def derived_record(name, split, records, what):
    """The record of a run scored from other runs' models (an ensemble, a teacher): their settings, digests and
    patients."""
    first = records[0]
    return dict(run=name, split=split, model_name=first["model_name"], reads=first["reads"], derived=what,
                members=[f"{r['run']}/{r['split']}" for r in records],
                digest=digest([[r["digest"], r["seen_patients"]] for r in records]),
                settings=first["settings"], run_settings=first["run_settings"], commit=commit(),
                seen_patients=union_seen([r["seen_patients"] for r in records]),
                sources=[s for r in records for s in r["sources"]])


def read_record(folder):
    return read_json_or_none(RunFiles(folder).record)


def write_record(folder, record):
    write_json(RunFiles(folder).record, record)


def shown(value):
    return ",".join(map(str, value)) if isinstance(value, list) else repr(value) if value == "" else str(value)


def differences(record, values):
    """What differs between a run's record and what the command would record now, e.g. 'epochs 1 -> 2'."""
    if not record or "settings" not in record:
        return ["no record of its settings (trained by an earlier version of the pipeline)"]
    out = []
    for part in ("settings", "run_settings", "flags"):
        old, new = record.get(part) or {}, values[part]
        out += [f"{k} {shown(old.get(k))} -> {shown(new.get(k))}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
    if record.get("model") != values["model"]:
        out.append(f"model {record.get('model')} -> {values['model']}")
    if values["data"] and record.get("data") != values["data"]:
        out.append("its split or images (the index or split files changed since)")
    return out


def stale(cfg, spec, split):
    """'run/split: what differs' when a finished (or, with --resume, an interrupted) run was trained under other
    settings than the command's; '' when it may be reused or there is nothing to reuse."""
    folder = run_dir(cfg, spec.name, split)
    files = RunFiles(folder)
    finished = files.metrics.exists()
    resuming = cfg.resume and files.last.exists()
    if cfg.force or not (finished or resuming):
        return ""
    values = expected(cfg, spec, split)
    record = read_record(folder)
    if record and record.get("digest") == digest(values):
        return ""
    return f"{spec.name}/{split}: {'; '.join(differences(record, values))}"


def tuning_leak(cfg, spec, split):
    """'run/split: which study saw which of its test patients' when the tuning study behind a run's settings trained
    or validated on one of them; '' otherwise."""
    source = tuning_source(run_config(cfg, spec, split))
    if source is None or not split_path(cfg, split).exists():
        return ""
    frame = load_split(cfg, split)
    test = set(frame.loc[frame["role"] == "test", "patient_id"])
    seen = sorted(test & set(source["train"] + source["val"]))
    if not seen:
        return ""
    return (f"{spec.name}/{split}: {source['name']} trained or validated on {len(seen)} of its {len(test)} test "
            f"patients ({', '.join(seen[:5])}{' ...' if len(seen) > 5 else ''})")


def tuning_error(problems):
    return PipelineError("settings tuned on the test patients of the runs they would train:\n  " +
                         "\n  ".join(problems) + "\nA study over the fixed split's train+val patients holds most CV "
                         "test patients, so its settings are honest for the fixed split only (--stages fixed). For "
                         "cross-validation tune each fold on its own training patients: python main.py --stages tune "
                         "--tune-scope per_fold, then --stages cv --tuned-folds OUTPUT/tuning.")


def stale_error(problems):
    return PipelineError(f"{len(problems)} finished run(s) were trained under other settings than this command's and "
                         f"would be reused under the new ones:\n  " + "\n  ".join(problems) +
                         "\nNothing was trained or deleted. Retrain them with --force, or start a separate experiment "
                         "with --output-dir PATH.")
