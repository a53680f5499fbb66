import errno
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tests.conftest import TEST_SETTINGS

from config import Config, config_fields, demo_overrides
from utils.checks import RULES, check_config, flag, resource_errors
from utils.helpers import PipelineError, size_text


def rejected(**changes):
    with pytest.raises(PipelineError) as e:
        check_config(replace(Config(), **changes))
    return str(e.value)


@pytest.mark.parametrize("name", list(config_fields()))
def test_every_field_has_a_rule_that_names_its_flag(name):
    assert name in RULES, f"config field '{name}' needs a rule in its setting() in config.py"
    rule = RULES[name]
    message = rejected(**{name: rule.bad})
    assert message.startswith(flag(name) + " ")
    assert rule.allowed in message
    assert "\n" not in message


def test_rules_only_for_existing_fields():
    assert set(RULES) == set(config_fields())


@pytest.mark.parametrize("settings", [{}, demo_overrides(), TEST_SETTINGS], ids=["defaults", "demo", "tests"])
def test_shipped_settings_pass(settings):
    check_config(replace(Config(), **settings))


def test_message_names_flag_value_and_range():
    assert rejected(epochs=-1) == "--epochs -1 is out of range: must be an integer >= 1"


@pytest.mark.parametrize("changes", [
    dict(image_size=48), dict(image_size=16), dict(epochs=True), dict(lr=float("nan")), dict(lr=0.0),
    dict(val_fraction=1.0), dict(fixed_split=(0.7, 0.3)), dict(fixed_split=(0.8, 0.2, 0.0)),
    dict(magnifications=("50X",)), dict(magnifications=()), dict(device="cuda:x"), dict(amp="false"),
    dict(n_folds=1), dict(folds=(0, 0)), dict(seed=2**32), dict(data_root=" "),
])
def test_bad_values_rejected(changes):
    (name,) = changes
    assert rejected(**changes).startswith(flag(name) + " ")


@pytest.mark.parametrize("changes", [
    dict(image_size=64), dict(device="cuda:1"), dict(device="mps"), dict(magnifications=("400X", "40X")),
    dict(fixed_split=(0.6, 0.2, 0.2)), dict(folds=(4, 0)), dict(grad_clip=0.0), dict(cache_dir=""), dict(lr=1),
])
def test_good_values_pass(changes):
    check_config(replace(Config(), **changes))


def test_folds_beyond_n_folds():
    message = rejected(n_folds=3, folds=(0, 3))
    assert message.startswith("--folds 0,3 ") and "0..2" in message


def test_unknown_stage_named():
    cfg = replace(Config(), stages=("cv", "trian"))
    with pytest.raises(PipelineError, match="--stages cv,trian"):
        check_config(cfg, stage_names=("split", "cv", "train"))
    check_config(replace(cfg, stages=("cv",)), stage_names=("split", "cv"))


def test_pretrained_path_must_exist(tmp_path):
    weights = tmp_path / "w.pth"
    assert rejected(pretrained_path=str(weights)).startswith("--pretrained-path ")
    weights.write_bytes(b"x")
    check_config(replace(Config(), pretrained_path=str(weights)))


def boom(error):
    raise error


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), MemoryError()])
def test_out_of_memory_names_the_flags_to_lower(monkeypatch, error):
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda *a: boom(error))
    with pytest.raises(PipelineError) as e, resource_errors("training", batch_flag="--batch-size"):
        torch.nn.Linear(2, 2)(torch.zeros(1, 2))
    assert "--batch-size" in str(e.value) and "--image-size" in str(e.value)


def test_disk_full_names_the_folder(monkeypatch, tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / "metrics.json"))
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: boom(full))
    with pytest.raises(PipelineError) as e, resource_errors("writing results"):
        (tmp_path / "runs" / "metrics.json").write_text("{}")
    assert str(tmp_path / "runs") in str(e.value) and "--output-dir" in str(e.value)
    with pytest.raises(PipelineError) as e, resource_errors("run x", folder=tmp_path / "runs" / "x", needs_bytes=1.46e9):
        boom(full)
    assert f"holding {tmp_path / 'runs' / 'x'} (" in str(e.value) and "free now" in str(e.value)
    assert "it needs about 1.5 GB there" in str(e.value)


def test_sizes_read_in_gb_or_mb():
    assert (size_text(1.46e9), size_text(2.5e8), size_text(0)) == ("1.5 GB", "250.0 MB", "0.0 MB")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_real_disk_full_is_caught():
    with pytest.raises(PipelineError, match="no space left"), resource_errors("writing", folder="/dev"):
        with open("/dev/full", "w") as f:
            f.write("x" * 100_000)


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(FileNotFoundError), resource_errors("reading"):
        (tmp_path / "missing.txt").read_text()


def test_every_flag_explains_itself():
    """--help gives every flag a line of what it does beyond its default, and its choices where it has them."""
    import main
    actions = {a.dest: a for a in main.build_parser()._actions}
    for name, f in config_fields().items():
        action = actions[name]
        what, _, default = action.help.partition("; default: ")
        assert len(what) > 20 and default, name
        assert f.metadata["help"].replace("%", "%%") in what, name
        if RULES[name].choices:
            assert action.metavar == "{" + ",".join(RULES[name].choices) + "}", name
    assert len(actions["config"].help) > 20
