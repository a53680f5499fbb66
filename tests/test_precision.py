"""The GPU code paths on CPU: bf16 autocast + channels_last + torch.compile, fp16 + GradScaler, fused AdamW; finite
losses, reloadable checkpoints, predictions that agree with the fp32 eager model. Training compiles with aot_eager
(dynamo graphs and the compiled backward, without inductor's C++ build of every kernel, minutes on a 2-core CPU);
the trained model's forward compiles with inductor."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from backbones import build_model
from stages.training.checkpoint import load_model, read_checkpoint
from stages.training.data import prepare_run
from stages.training.forward import amp_settings, predict
from stages.training.train import build_optimizer, fit
from stages.training.runs import REFERENCE
from tests.conftest import model_settings, prepared_output
from utils.env import precision_dtype, switch

CPU = torch.device("cpu")
BF16_TOLERANCE = 0.03   # bf16 keeps 8 bits of mantissa: probabilities agree with fp32 to a few hundredths
FP16_TOLERANCE = 0.005  # fp16 keeps 11


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_root):
    return prepared_output(tmp_path_factory, tiny_root, "precision", epochs=2, selection="auc")


def train(cfg, name):
    run = prepare_run(cfg, name, "fold_0", REFERENCE, {})
    model = build_model(REFERENCE, **run.model_kwargs)
    state = fit(cfg, model, run, CPU)
    return run, model, state


def fp32_gap(model, run, dtype):
    """Largest |P(malignant)| difference on the test tuples between `dtype` autocast and fp32 eager."""
    low = predict(model, run.bank, run.batches["test"], CPU, dtype)["prob"]
    full = predict(model, run.bank, run.batches["test"], CPU, None)["prob"]
    return float(np.abs(low - full).max())


def check_run(cfg, run, model, state):
    losses = [r[k] for r in state.history for k in ("train_loss", "val_loss")]
    assert len(state.history) == cfg.epochs and np.isfinite(losses).all()
    best = run.folder / "checkpoints" / "best.pth"
    reloaded, _ = load_model(best)
    want = predict(model.float(), run.bank, run.batches["test"], CPU)["prob"]
    got = predict(reloaded, run.bank, run.batches["test"], CPU)["prob"]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_precision_settings_choose_the_autocast_dtype_and_scaler(prepared):
    cuda = torch.device("cuda")
    assert precision_dtype(prepared, CPU) is None
    assert precision_dtype(replace(prepared, amp=True), CPU) is None
    assert precision_dtype(replace(prepared, precision="bf16"), CPU) is torch.bfloat16
    assert precision_dtype(replace(prepared, precision="fp32", amp=True), cuda) is None
    dtype, scaler = amp_settings(replace(prepared, precision="fp16"), CPU)
    assert dtype is torch.float16 and isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert amp_settings(replace(prepared, precision="bf16"), CPU)[1] is None
    assert switch("auto", cuda) and not switch("auto", CPU) and switch("on", CPU) and not switch("off", cuda)


def test_bf16_channels_last_and_compile_train_on_cpu(prepared):
    cfg = replace(prepared, precision="bf16", channels_last="on", fused_adamw="on", compile=True,
                  compile_backend="aot_eager")
    run, model, state = train(cfg, "bf16_compiled")
    assert model.backbones[0].conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    check_run(cfg, run, model, state)
    assert fp32_gap(model, run, torch.bfloat16) < BF16_TOLERANCE
    batch = next(iter(run.batches["test"]))
    x, mask = run.bank.batch(batch[0], CPU, False, model.normalization)
    compiled = torch.compile(model.eval(), backend="inductor", fullgraph=True)
    with torch.no_grad():
        want, got = model(x, mask)["binary_logits"], compiled(x, mask)["binary_logits"]
    np.testing.assert_allclose(torch.sigmoid(got).numpy(), torch.sigmoid(want).numpy(), atol=1e-4)


def test_fp16_with_a_grad_scaler_trains_and_resumes_on_cpu(prepared):
    cfg = replace(prepared, precision="fp16")
    run, model, state = train(cfg, "fp16_scaled")
    check_run(cfg, run, model, state)
    last = read_checkpoint(run.folder / "checkpoints" / "last.pth")
    assert last["scaler"] is not None and last["scaler"]["scale"] > 0
    assert fp32_gap(model, run, torch.float16) < FP16_TOLERANCE
    resumed = replace(cfg, epochs=3, resume=True)
    _, _, again = train(resumed, "fp16_scaled")
    assert [r["epoch"] for r in again.history] == [1, 2, 3]


def test_fused_adamw_follows_its_setting(prepared):
    model = build_model(REFERENCE, **model_settings(backbone=prepared.backbone, num_subtypes=2))
    assert build_optimizer(model, replace(prepared, fused_adamw="on"), CPU).defaults["fused"]
    assert not build_optimizer(model, prepared, CPU).defaults["fused"]


def test_gpu_placement_and_job_count_follow_free_memory(monkeypatch, prepared):
    from stages.training.schedule import job_count
    from utils.env import fits_on_gpu
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    cuda = torch.device("cuda")
    assert fits_on_gpu(19 * gib, cuda) and not fits_on_gpu(21 * gib, cuda) and not fits_on_gpu(1, CPU)
    monkeypatch.setattr("stages.training.schedule.resolve_device", lambda name: cuda)
    monkeypatch.setattr("stages.training.schedule.run_bytes", lambda cfg, device: 10 * gib)
    assert job_count(replace(prepared, jobs=0)) == 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * gib, 80 * gib))
    assert job_count(replace(prepared, jobs=0)) == 1 and job_count(replace(prepared, jobs=2)) == 2


def test_config_json_records_the_lock():
    from utils.env import ROOT, environment
    import hashlib
    env = environment()
    assert env["lock_sha256"] == hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()
    assert env["packages"]["torch"] and set(env["packages"]) >= {"timm", "numpy", "scikit-learn", "pytest"}
