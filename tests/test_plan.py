"""--plan: the units it lists as to train are the units the command then trains; reuse and refusal are foreseen."""
import re
from pathlib import Path

import main
from tests.test_pipeline import flags

LINE = re.compile(r"^plan: (\d+) units \((\d+) to train, (\d+) reused\), est\. \d+\.\d min on .+, peak disk "
                  r"\d+\.\d GB \(free \d+\.\d GB\)$", re.M)
RUNS = ["--folds", "0", "--runs", "mmnet,single_40X,any_mag"]


def planned(out, action):
    return sorted(m.group(1) for m in re.finditer(rf"^  {action} +\w+ +(\S+) \[", out, re.M))


def trained(output):
    return sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in Path(output).glob("runs/*/*/metrics.json"))


def test_the_plan_lists_what_the_command_trains_then_reuses_and_refuses(make_cfg, capsys):
    cfg = make_cfg(epochs=1)
    args = flags(cfg, "analyze,split,cv,baselines") + RUNS
    assert main.main(args + ["--plan"]) == 0
    out = capsys.readouterr().out
    line = LINE.search(out)
    assert line and line.groups() == ("3", "3", "0"), out[-3000:]
    assert trained(cfg.output_dir) == []
    to_train = planned(out, "train")
    assert to_train == ["any_mag/fold_0", "mmnet/fold_0", "single_40X/fold_0"]
    assert main.main(args) == 0
    capsys.readouterr()
    assert trained(cfg.output_dir) == to_train
    assert main.main(args + ["--plan"]) == 0
    again = capsys.readouterr().out
    assert LINE.search(again).groups() == ("3", "0", "3") and planned(again, "reuse") == to_train
    changed = [a if a != "1" or args[i - 1] != "--epochs" else "2" for i, a in enumerate(args)]
    assert main.main(changed + ["--plan"]) == 0
    refused = capsys.readouterr().out
    assert planned(refused, "refuse") == to_train and "would stop the command" in refused


def test_a_plan_with_a_bad_flag_exits_2(make_cfg, capsys):
    cfg = make_cfg()
    assert main.main(flags(cfg, "analyze,split,cv") + ["--epochs", "0", "--plan"]) == 2
    assert "--epochs" in capsys.readouterr().out


def test_the_plan_lists_the_protocol_units_the_command_trains(make_cfg, capsys):
    cfg = make_cfg(epochs=1)
    args = flags(cfg, "analyze,split,protocol") + ["--folds", "0"]
    assert main.main(args + ["--plan"]) == 0
    out = capsys.readouterr().out
    assert LINE.search(out).groups() == ("2", "2", "0"), out[-3000:]
    assert "est. protocol" in out
    to_train = sorted(m.group(1) for m in re.finditer(r"^  train +protocol +(\S+) \[", out, re.M))
    assert to_train == ["any_mag/fold_0", "mmnet/fold_0"]
    assert main.main(args) == 0
    assert trained(Path(cfg.output_dir) / "protocol") == to_train
    assert trained(cfg.output_dir) == []
