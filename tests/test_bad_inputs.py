"""The bad-input catalogue: each case ends in a clear message, exit code 2 where it stops, and nothing lost."""
import errno
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import main
import stages.training.checkpoint as checkpoint
from tests.test_pipeline import flags
from utils.helpers import RunFiles, run_dir, write_atomic


def run(cfg, stages, *extra):
    return main.main(flags(cfg, stages) + list(extra))


def test_wrong_root_names_the_path(make_cfg, tmp_path, capsys):
    cfg = make_cfg(data_root=str(tmp_path / "no_such_folder"))
    assert run(cfg, "analyze") == 2
    text = capsys.readouterr().out
    assert "no_such_folder" in text and "setup.sh" in text and "Traceback" not in text


def test_empty_root(make_cfg, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(make_cfg(data_root=str(tmp_path / "empty")), "analyze") == 2
    assert "empty" in capsys.readouterr().out


def test_root_with_only_junk(make_cfg, tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    for name in ("Thumbs.db", ".DS_Store", "notes.txt"):
        (junk / name).write_bytes(b"not an image")
    assert run(make_cfg(data_root=str(junk)), "analyze") == 2
    assert "junk" in capsys.readouterr().out


def copy_tree(tiny_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    return root


def test_truncated_png_is_excluded_and_listed(make_cfg, tiny_root, tmp_path):
    root = copy_tree(tiny_root, tmp_path)
    victim = sorted(root.rglob("*.png"))[5]
    victim.write_bytes(victim.read_bytes()[:200])
    cfg = make_cfg(data_root=str(root))
    assert run(cfg, "analyze,split") == 0
    excluded = pd.read_csv(tmp_path / "output" / "tables" / "excluded_images.csv")
    assert victim.name in " ".join(excluded.path.astype(str))
    index = pd.read_csv(tmp_path / "output" / "index.csv")
    assert victim.name not in set(index.file)


def test_missing_magnification_and_single_image_patient_still_train(make_cfg, tiny_root, tmp_path):
    root = copy_tree(tiny_root, tmp_path)
    slide = sorted(p for p in root.rglob("SOB_M_*") if p.is_dir())[0]
    for mag_dir in sorted(slide.iterdir())[1:]:
        shutil.rmtree(mag_dir)
    keep = sorted(slide.rglob("*.png"))
    for png in keep[1:]:
        png.unlink()
    cfg = make_cfg(data_root=str(root), epochs=1)
    assert run(cfg, "analyze,split,fixed") == 0
    preds = pd.read_csv(tmp_path / "output" / "runs" / "mmnet" / "fixed" / "predictions.csv")
    masks = preds[preds.level == "tuple"].filter(like="mask_")
    assert (masks.sum(axis=1) < masks.shape[1]).any()


@pytest.mark.parametrize("stage,needs", [("split", "analyze"), ("cv", "split"), ("explain", "fixed"), ("report", "cv")])
def test_stage_before_its_inputs(make_cfg, capsys, stage, needs):
    cfg = make_cfg()
    before = [s for s in ("analyze", "split") if list(main.DEFAULT).index(s) < list(main.DEFAULT).index(needs)]
    if before:
        assert run(cfg, ",".join(before)) == 0
        capsys.readouterr()
    assert run(cfg, stage) == 2
    text = capsys.readouterr().out
    assert f"--stages {needs}" in text and "Traceback" not in text


def test_unwritable_output_dir(make_cfg, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = make_cfg(output_dir=str(blocker / "output"))
    assert run(cfg, "analyze") == 2
    assert "--output-dir" in capsys.readouterr().out


def test_full_disk_names_the_folder_and_space_and_leaves_no_finished_run(make_cfg, monkeypatch, capsys):
    cfg = make_cfg(epochs=1)
    assert run(cfg, "analyze,split") == 0
    capsys.readouterr()

    def half_then_full(path, data):
        def write(f):
            f.write(bytes(data[:100]))
            raise OSError(errno.ENOSPC, "No space left on device")
        write_atomic(path, write, binary=True)

    monkeypatch.setattr(checkpoint, "write_bytes", half_then_full)
    assert run(cfg, "fixed") == 2
    text = capsys.readouterr().out
    files = RunFiles(run_dir(cfg, "mmnet", "fixed"))
    assert f"no space left on the disk holding {files.folder} (" in text and "Traceback" not in text
    assert re.search(r"free now; it needs about \d+\.\d [MG]B there in all", text)
    assert not files.metrics.exists() and not files.best.exists() and not list(files.folder.rglob("*.tmp"))
    monkeypatch.undo()
    assert run(cfg, "fixed") == 0 and files.metrics.exists()


def test_full_disk_after_fitting_says_the_space_the_last_writes_need(make_cfg, monkeypatch, capsys):
    import stages.training.run as run_module
    cfg = make_cfg(epochs=1)
    assert run(cfg, "analyze,split") == 0
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module, "write_csv", full)
    assert run(cfg, "fixed") == 2
    text = capsys.readouterr().out
    files = RunFiles(run_dir(cfg, "mmnet", "fixed"))
    assert f"no space left on the disk holding {files.folder} (" in text and "Traceback" not in text
    assert re.search(r"it needs about \d+\.\d [MG]B there in all", text)
    assert not files.metrics.exists()


def test_an_image_cache_the_disk_cannot_hold_stops_before_writing(make_cfg, monkeypatch, capsys):
    import utils.checks as checks
    from preprocess.cache import cache_folder
    cfg = make_cfg(epochs=1)
    assert run(cfg, "analyze,split") == 0
    capsys.readouterr()
    monkeypatch.setattr(checks, "free_bytes", lambda folder: 1000)
    assert run(cfg, "fixed") == 2
    text = capsys.readouterr().out
    assert "the image cache: no space left on the disk holding" in text and "Traceback" not in text
    assert re.search(r"0.0 MB free now; it needs about \d+\.\d [MG]B there in all", text), text[-1500:]
    assert not list(cache_folder(cfg).glob("images_*.npy"))
    monkeypatch.undo()
    assert run(cfg, "fixed") == 0


def test_checkpoint_from_other_configuration(make_cfg, capsys):
    cfg = make_cfg(epochs=1)
    assert run(cfg, "analyze,split,fixed") == 0
    capsys.readouterr()
    assert run(cfg, "fixed", "--resume", "--force", "--image-size", "64") == 2
    text = capsys.readouterr().out
    assert "image_size" in text and "Traceback" not in text


def test_mistyped_stage_lists_the_valid_ones(make_cfg, capsys):
    assert run(make_cfg(), "analyse") == 2
    text = capsys.readouterr().out
    assert all(name in text for name in main.STAGES)


def test_mistyped_flag_suggests_the_right_one(capsys):
    with pytest.raises(SystemExit) as stop:
        main.main(["--data-rot", "x"])
    assert stop.value.code == 2
    assert "--data-root" in capsys.readouterr().err


def test_interrupted_mid_epoch_then_resumed(make_cfg, monkeypatch, capsys):
    from stages.training.train import Optimisation
    cfg = make_cfg(epochs=3)
    assert run(cfg, "analyze,split") == 0
    real_step, calls = Optimisation.step, []

    def stop_in_second_epoch(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        real_step(*args)

    monkeypatch.setattr(Optimisation, "step", stop_in_second_epoch)
    assert run(cfg, "fixed") == 130
    assert "--resume" in capsys.readouterr().out
    folder = Path(cfg.output_dir) / "runs" / "mmnet" / "fixed"
    assert pd.read_csv(folder / "history.csv").epoch.tolist() == [1]
    monkeypatch.setattr(Optimisation, "step", real_step)
    assert run(cfg, "fixed", "--resume") == 0
    assert "Resuming" in capsys.readouterr().out
    assert pd.read_csv(folder / "history.csv").epoch.tolist() == [1, 2, 3]
    assert (folder / "metrics.json").exists()
    last = torch.load(folder / "checkpoints" / "last.pth", weights_only=False)
    assert "optimizer" not in last and last["epoch"] == 3
