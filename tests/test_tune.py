"""Tuning: the search space and its file, pruning, failed trials, the study across reruns and processes, and the
objective never reading an outer test patient."""
import json
import os
import shutil
import socket
import subprocess
from dataclasses import replace

import cv2
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import FixedTrial

import main
import stages.tuning.trial as tune_trial
from preprocess.analyze import load_index, run_analyze
from preprocess.preprocess import load_split, run_split
from stages.tuning.tune import fail_stale, open_study, pruner, run_tune, storage
from stages.tuning.space import default_space, load_space, suggest
from stages.tuning.trial import pruning_report
from tests.conftest import TEST_SETTINGS
from utils.config_file import read_config_file
from utils.helpers import PipelineError

ISSUE_SPACE = {"lr", "weight_decay", "drop_rate", "focal_gamma", "tuples_per_patient", "warmup_epochs",
               "frozen_epochs", "feature_stage"}


def flags(settings):
    argv = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return argv


def tune_cfg(make_cfg, tmp_path, **overrides):
    """Fold 0's own study (two inner splits of its train+val patients), two trials."""
    settings = dict(stages=("tune",), folds=(0,), tune_trials=2, tune_scope="per_fold", inner_folds=2,
                    cache_dir=str(tmp_path / "cache"))
    cfg = make_cfg(**dict(settings, **overrides))
    run_analyze(cfg)
    run_split(cfg)
    return cfg


def trials(cfg, folder="fold_0"):
    return pd.read_csv(f"{cfg.output_dir}/tuning/{folder}/trials.csv")


def test_default_space_covers_the_training_settings(make_cfg):
    cfg = make_cfg()
    assert set(default_space(cfg)) == ISSUE_SPACE
    assert set(default_space(replace(cfg, pretrained=True))) == ISSUE_SPACE | {"backbone_lr_scale"}
    assert "frozen_epochs" not in default_space(replace(cfg, freeze_backbone=True))
    values = suggest(optuna.trial.FixedTrial({"feature_stage": "2", "frozen_epochs": 1, "lr": 1e-3}),
                     {k: v for k, v in load_space(cfg).items() if k in ("feature_stage", "frozen_epochs", "lr")})
    assert values["feature_stage"] in (2, (2,)) and values["frozen_epochs"] == 1 and values["lr"] == 1e-3


def test_space_file_replaces_drops_and_fixes(make_cfg, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {type: float, low: 0.001, high: 0.002}\ndrop_rate: null\npatience: 3\n"
                    "epochs: {type: int, low: 2, high: 3}\n")
    space = load_space(make_cfg(tune_space=str(path)))
    assert space["lr"]["low"] == 0.001 and "drop_rate" not in space and "epochs" in space
    params = {"lr": 0.0015, "epochs": 3, "weight_decay": 0.01, "focal_gamma": 1.0, "tuples_per_patient": 4,
              "warmup_epochs": 0, "frozen_epochs": 0, "feature_stage": "-1"}
    values = suggest(FixedTrial(params), space)
    assert values["patience"] == 3 and values["epochs"] == 3 and isinstance(values["lr"], float)


def test_selection_is_never_tuned(make_cfg, tmp_path):
    """Trials keep weights by swa: a rule that picks the epoch on the validation patients would inflate the score
    that compares trials."""
    assert "selection" not in default_space(make_cfg())
    path = tmp_path / "space.yaml"
    path.write_text("selection: {type: categorical, choices: [auc, swa]}\n")
    with pytest.raises(PipelineError, match="selection cannot be tuned"):
        load_space(make_cfg(tune_space=str(path)))
    assert tune_trial.trial_config(make_cfg(selection="auc"), {"lr": 1e-3}).selection == "swa"


@pytest.mark.parametrize("text, words", [
    ("lr: {type: gauss, low: 1, high: 2}", "type 'gauss'"),
    ("lr: {type: float, low: 0.01, high: 0.001}", "low <= high"),
    ("threshold_rule: {type: categorical, choices: [fixed_0.5, best]}", "'best'"),
    ("tuples_per_patient: {type: float, low: 2, high: 8}", "use type int"),
    ("learning_rate: {type: float, low: 0.1, high: 0.2}", "unknown field"),
    ("[1, 2]", "mapping"),
])
def test_bad_space_file_is_named(make_cfg, tmp_path, text, words):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match="--tune-space") as e:
        load_space(make_cfg(tune_space=str(path)))
    assert words in str(e.value)


def test_median_pruning_stops_a_trial_below_the_others(make_cfg):
    study = optuna.create_study(direction="maximize", pruner=pruner(make_cfg(epochs=4)))
    for _ in range(2):
        trial = study.ask()
        for step in range(1, 5):
            trial.report(0.9, step)
        study.tell(trial, 0.9)
    good, poor = study.ask(), study.ask()
    for epoch in (1, 2, 3):
        pruning_report(good, [], 0, 4)(epoch, 0.95)
    pruning_report(poor, [], 0, 4)(1, 0.2)
    with pytest.raises(optuna.TrialPruned):
        pruning_report(poor, [], 0, 4)(3, 0.2)


def test_tune_runs_only_on_request():
    assert "tune" not in main.stage_list(main.Config())
    assert main.stage_list(replace(main.Config(), stages=("tune", "split"))) == ["split", "tune"]


def test_config_file_round_trips_the_written_config(make_cfg, tmp_path):
    cfg = make_cfg(stages=("analyze",), seed=7, magnifications=("40X", "200X"), fixed_split=(0.6, 0.2, 0.2))
    argv = flags({k: getattr(cfg, k) for k in (*TEST_SETTINGS, "data_root", "output_dir", "stages", "seed",
                                                 "magnifications", "fixed_split")})
    assert main.main(argv) == 0
    written = f"{cfg.output_dir}/config.json"
    assert main.resolve_config(["--config", written]) == main.resolve_config(argv)
    assert main.resolve_config(["--config", written, "--epochs", "5"]) == replace(main.resolve_config(argv), epochs=5)


def test_config_file_yaml_values_and_errors(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("lr: 1\nmagnifications: 40X,100X\nselection: auc\n")
    cfg = main.resolve_config(["--config", str(good)])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.magnifications == ("40X", "100X")
    for text, words in [("tuple_per_patient: 4\n", "did you mean tuples_per_patient"), ("epochs: -1\n", "field epochs"),
                        ("lr: [1, 2\n", "not readable")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        assert main.main(["--config", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
        assert words in capsys.readouterr().out
    assert main.main(["--config", str(tmp_path / "missing.json")]) == 2


def test_tuning_never_reads_a_test_patient_and_resumes(make_cfg, tiny_root, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(tiny_root, root)
    cfg = tune_cfg(make_cfg, tmp_path, data_root=str(root))
    split = load_split(cfg, "fold_0")
    test_ids = set(split.loc[split.role == "test", "patient_id"])
    index = load_index(cfg)
    for path in index.loc[index.patient_id.isin(test_ids), "path"]:
        with open(path, "wb") as f:
            f.write(b"not an image any more")
    assert cv2.imread(str(path)) is None
    argv = flags({k: getattr(cfg, k) for k in (*TEST_SETTINGS, "data_root", "output_dir", "cache_dir", "tune_scope",
                                                 "inner_folds")})
    assert main.main([*argv, "--stages", "cv", "--folds", "0"]) == 2
    assert main.main([*argv, "--stages", "tune", "--folds", "0", "--tune-trials", "2"]) == 0
    first = trials(cfg)
    written = json.loads((tmp_path / "output" / "tuning" / "fold_0" / "best_config.json").read_text())
    seen = written["tuning_study"]["seen_patients"]
    assert set(seen["train"]) | set(seen["val"]) == set(split.loc[split.role != "test", "patient_id"])
    assert list(first.state) == ["COMPLETE", "COMPLETE"] and first.value.between(0, 1).all()
    best = read_config_file(f"{cfg.output_dir}/tuning/fold_0/best_config.json")
    assert best["lr"] == first.sort_values("value", ascending=False).lr.iloc[0] and best["selection"] == "swa"
    assert main.main([*argv, "--stages", "tune", "--folds", "0", "--tune-trials", "1"]) == 0
    again = trials(cfg)
    assert list(again.number) == [0, 1, 2] and again.study.nunique() == 1
    assert (tmp_path / "output" / "tuning" / "fold_0" / "optimization_history.png").stat().st_size > 0


def test_out_of_memory_trial_fails_and_the_study_goes_on(make_cfg, tmp_path, monkeypatch):
    cfg = tune_cfg(make_cfg, tmp_path, epochs=1)
    calls = []
    fit = tune_trial.fit

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return fit(*args, **kwargs)

    monkeypatch.setattr(tune_trial, "fit", flaky)
    run_tune(cfg)
    table = trials(cfg)
    assert list(table.state) == ["FAIL", "COMPLETE"]
    assert "out of GPU memory" in table.error.iloc[0]
    best = json.loads((tmp_path / "output" / "tuning" / "fold_0" / "best_config.json").read_text())
    assert best["lr"] == table.lr.iloc[1]


def test_parallel_processes_share_one_study(make_cfg, tmp_path):
    cfg = tune_cfg(make_cfg, tmp_path, epochs=1, jobs=2)
    run_tune(cfg)
    table = trials(cfg)
    assert len(table) >= 2 and table.number.is_unique and set(table.state) <= {"COMPLETE", "PRUNED"}
    assert list(table.sort_values("number").state[:2]) == ["COMPLETE", "COMPLETE"], "the median rule waits for two"
    assert set(table.worker) <= {0, 1}
    logs = list((tmp_path / "output" / "tuning" / "fold_0").glob("*/worker*.log"))
    assert sorted(p.name for p in logs) == ["worker0.log", "worker1.log"]


def test_a_trial_left_running_by_a_dead_process_is_marked_failed(make_cfg):
    cfg = make_cfg()
    store = storage(cfg)
    study = open_study(cfg, "stale", store)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):
        trial = study.ask()
        trial.set_user_attr("pid", pid)
        trial.set_user_attr("host", socket.gethostname())
    fail_stale(study, store)
    states = [t.state.name for t in open_study(cfg, "stale", storage(cfg)).trials]
    assert states == ["FAIL", "RUNNING"]


def test_the_fixed_split_study_is_honest_for_fixed_runs_and_refused_for_cv(make_cfg, tmp_path, capsys):
    """The default study tunes on the fixed split's train+val patients (its member splits) and never reads a fixed test
    patient; its patients travel in best_config.json, so fixed runs trained with it pass the leak guard while a cv run,
    whose test patients the study saw, is refused before anything trains, naming the study."""
    cfg = tune_cfg(make_cfg, tmp_path, tune_scope="fixed", n_folds=2, tune_trials=1, epochs=1)
    argv = flags({k: getattr(cfg, k) for k in (*TEST_SETTINGS, "data_root", "output_dir", "cache_dir", "n_folds")})
    assert main.main([*argv, "--stages", "tune", "--tune-trials", "1", "--epochs", "1"]) == 0
    path = tmp_path / "output" / "tuning" / "best_config.json"
    block = json.loads(path.read_text())["tuning_study"]
    fixed = load_split(cfg, "fixed")
    assert block["splits"] == ["member_0", "member_1"] and block["outer"] == "fixed"
    assert set(block["seen_patients"]["train"]) | set(block["seen_patients"]["val"]) == set(
        fixed.loc[fixed.role != "test", "patient_id"])
    tuned = ["--config", str(path), "--output-dir", cfg.output_dir, "--cache-dir", cfg.cache_dir]
    assert main.main([*tuned, "--stages", "fixed", "--runs", "mmnet"]) == 0
    record = json.loads((tmp_path / "output" / "runs" / "mmnet" / "fixed" / "record.json").read_text())
    assert record["tuning"] == str(path) and any(block["study"] in s["name"] for s in record["sources"])
    capsys.readouterr()
    assert main.main([*tuned, "--stages", "cv", "--folds", "0", "--runs", "mmnet"]) == 2
    text = capsys.readouterr().out
    assert f"tuning study {block['study']}" in text and "mmnet/fold_0" in text
    assert not (tmp_path / "output" / "runs" / "mmnet" / "fold_0").exists()
    assert main.main([*tuned, "--stages", "report"]) == 0
