"""One home per setting: every Config field carries its kind and its rule in config.py, and the lists other modules
keep (the record's shaping settings, the tune stage's left-out fields, the rules) are derived from them."""
from dataclasses import replace

import pytest

from config import KINDS, Config, config_fields, demo_overrides, of_kind, setting
from stages.training import record
from stages.tuning import tune
from utils.checks import RULES
from rules import Rule, integer


@pytest.mark.parametrize("name", list(config_fields()))
def test_every_field_has_a_kind_and_a_rule(name):
    meta = config_fields()[name].metadata
    assert meta["kind"] in KINDS, name
    assert isinstance(meta["rule"], Rule), name
    assert RULES[name] is meta["rule"]


@pytest.mark.parametrize("cfg", [Config(), replace(Config(), **demo_overrides())], ids=["defaults", "demo"])
def test_the_record_shapes_on_exactly_the_shaping_fields(cfg):
    assert list(record.shaping(cfg)) == [n for n, f in config_fields().items() if f.metadata["kind"] == "shaping"]


def test_kinds_split_the_fields():
    groups = [of_kind(kind) for kind in KINDS]
    assert sorted(n for g in groups for n in g) == sorted(config_fields())
    assert (record.COMPUTE, record.RUN_CONTROL, record.PER_RUN) == (of_kind("compute"), of_kind("control"),
                                                                  of_kind("per_run"))


def test_best_config_leaves_out_only_controls_and_compute_fields():
    either = set(of_kind("control", "compute"))
    assert set(tune.CARRIED) <= either and set(tune.NOT_SETTINGS) == either - set(tune.CARRIED)


@pytest.mark.parametrize("args", [(1, "speed", integer(0), "help"), (1, "shaping", None, "help"), (1, "shaping")])
def test_a_setting_without_a_known_kind_or_a_rule_fails(args):
    with pytest.raises(TypeError):
        setting(*args)


def test_an_unknown_kind_is_named():
    with pytest.raises(ValueError, match="speed"):
        of_kind("speed")
