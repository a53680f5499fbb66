"""Distillation: the loss, a student trained on the fixed split from an honest teacher, its row in table 4."""
from pathlib import Path

import pandas as pd
import pytest
import torch

import main
from preprocess.preprocess import load_split
from stages.training import distill, ensemble
from stages.training.checkpoint import load_model
from stages.training.distill import Distillation
from stages.training.ensemble import ENSEMBLE
from stages.training.runs import REFERENCE, STUDENT, TEACHER
from tests.conftest import copy_output
from tests.test_pipeline import flags
from utils.helpers import read_json, write_json
from utils.losses import distillation_loss
from stages.report.registry import TABLE_NAMES

STUDENT_FLAGS = ["--student-backbone", "test_convnext", "--student-image-size", "32", "--student-embed-dim", "16"]


def outputs(binary, subtype):
    return dict(binary_logits=torch.tensor(binary, requires_grad=True), subtype_logits=torch.tensor(subtype,
                                                                                                  requires_grad=True))


def test_loss_is_zero_at_the_teacher_and_pulls_towards_it():
    teacher = torch.tensor([1.5, -0.5]), torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.5, 0.0]])
    t = 3.0
    prob, sub = torch.sigmoid(teacher[0] / t), torch.softmax(teacher[1] / t, 1)
    same = distillation_loss(outputs(teacher[0].tolist(), teacher[1].tolist()), prob, sub, t)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    out = outputs([0.0, 0.0], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss = distillation_loss(out, prob, sub, t)
    loss.backward()
    assert loss.item() > 0
    assert (torch.sign(-out["binary_logits"].grad) == torch.sign(teacher[0])).all()
    assert int((-out["subtype_logits"].grad[0]).argmax()) == 0


class Constant(torch.nn.Module):
    """A teacher answering fixed logits whatever the images; records the input size it was given."""
    normalization = dict(mean=[0.5] * 3, std=[0.25] * 3)

    def forward(self, x, mask):
        self.size = x.shape[-1]
        n = x.shape[0]
        return dict(binary_logits=torch.full((n,), 2.0), subtype_logits=torch.zeros(n, 3))


def test_the_weight_mixes_hard_and_soft_and_the_teacher_sees_its_own_size():
    hard = lambda out, labels, subtypes: out["binary_logits"].sum() * 0 + 1.0  # noqa: E731
    teacher = Constant()
    x, mask = torch.zeros(2, 4, 3, 32, 32), torch.ones(2, 4, dtype=torch.bool)
    out = outputs([0.5, -0.5], [[0.0] * 3] * 2)
    norm = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    soft = distillation_loss(out, torch.sigmoid(torch.full((2,), 2.0) / 4), torch.full((2, 3), 1 / 3), 4.0)
    for weight in (0.0, 0.3, 1.0):
        loss = Distillation(hard, [(teacher, 64)], norm, 4.0, weight, 0.5)(out, None, None, x, mask)
        assert loss.item() == pytest.approx((1 - weight) * 1.0 + weight * soft.item(), rel=1e-5)
    assert teacher.size == 64
    assert Distillation(hard, [(teacher, 64)], norm, 4.0, 1.0, 0.5)(out, None, None).item() == 1.0


@pytest.fixture(scope="module")
def distilled(fixed_output, tmp_path_factory):
    cfg = copy_output(fixed_output, tmp_path_factory.mktemp("distill") / "output")
    assert main.main(flags(cfg, "distill,report") + STUDENT_FLAGS) == 0
    return cfg, Path(cfg.output_dir)


def test_student_is_smaller_and_trained_on_the_fixed_training_patients(distilled):
    cfg, out = distilled
    metrics = read_json(out / "runs" / STUDENT / "fixed" / "metrics.json")
    record = read_json(out / "runs" / STUDENT / "fixed" / "record.json")
    split = load_split(cfg, "fixed")
    roles = {r: set(split.loc[split["role"] == r, "patient_id"].astype(str)) for r in ("train", "val", "test")}
    seen = set(record["seen_patients"]["train"] + record["seen_patients"]["val"])
    assert roles["train"] <= set(record["seen_patients"]["train"]) and seen <= roles["train"] | roles["val"]
    assert any(s["name"].startswith("the teacher's mmnet_fixed_member/") for s in record["sources"])
    _, teachers = distill.teacher_run(cfg)
    assert len(teachers) == cfg.n_folds and all("mmnet_fixed_member" in str(p) for p in teachers)
    assert metrics["teacher"]["members"] == [str(p) for p in teachers] and metrics["teacher"]["run"] == TEACHER
    teacher_ckpt = teachers[0]
    student, ckpt = load_model(out / "runs" / STUDENT / "fixed" / "checkpoints" / "best.pth")
    teacher, _ = load_model(teacher_ckpt)
    assert ckpt["model_kwargs"]["backbone"] == "test_convnext" and ckpt["model_kwargs"]["embed_dim"] == 16
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
    assert "threshold" in ckpt
    pred = pd.read_csv(out / "runs" / STUDENT / "fixed" / "predictions.csv", dtype={"patient_id": str})
    assert set(pred.loc[pred["role"] == "test", "patient_id"]) == roles["test"]


def test_teacher_scores_are_the_honest_ensemble(distilled):
    _, out = distilled
    teacher = read_json(out / "runs" / TEACHER / "fixed" / "metrics.json")
    reference = read_json(out / "runs" / ENSEMBLE / "fixed" / "metrics.json")
    assert teacher["test"]["patient"]["t0.5"]["auc"] == pytest.approx(reference["test"]["patient"]["t0.5"]["auc"])


def test_table_4_has_the_student_beside_its_teacher(distilled):
    _, out = distilled
    t4 = pd.read_csv(out / "tables" / TABLE_NAMES["baseline"])
    rows = t4[t4["level"] == "patient"].set_index("model")
    for name in (STUDENT, TEACHER):
        assert rows.loc[name, "folds"] == "fixed"
        for column in ("accuracy_pooled", "auc_pooled", "params", "macs_g", "ms_per_patient"):
            assert pd.notna(rows.loc[name, column]), (name, column)
    assert rows.loc[STUDENT, "params"] < rows.loc[TEACHER, "params"]
    assert rows.loc[STUDENT, "macs_g"] < rows.loc[TEACHER, "macs_g"]


def test_a_teacher_that_saw_a_test_patient_is_refused(distilled, tmp_path, capsys):
    cfg, _ = distilled
    cfg = copy_output(cfg, tmp_path / "output")
    record_file = Path(cfg.output_dir) / "runs" / "mmnet_fixed_member" / "member_0" / "record.json"
    split = load_split(cfg, "fixed")
    test_patient = str(split.loc[split["role"] == "test", "patient_id"].iloc[0])
    record = read_json(record_file)
    record["sources"][0]["train"].append(test_patient)
    record["seen_patients"]["train"].append(test_patient)
    write_json(record_file, record)
    assert main.main(flags(cfg, "distill") + STUDENT_FLAGS + ["--force"]) == 2
    text = capsys.readouterr().out
    assert test_patient in text and "Traceback" not in text


def test_the_teacher_comes_from_one_switch(distilled, monkeypatch):
    cfg, out = distilled
    best = out / "runs" / REFERENCE / "fixed" / "checkpoints" / "best.pth"
    folder, paths = distill.teacher_run(cfg)
    assert paths == ensemble.honest_members(cfg) and folder == out / "runs" / ENSEMBLE / "fixed"
    monkeypatch.setattr(ensemble, "honest_members", lambda c: None)
    assert distill.teacher_run(cfg) == (out / "runs" / REFERENCE / "fixed", [best])
