"""What a config field accepts: a Rule (a test, its wording for messages and --help, one value it rejects) and the
small builders config.py gives each field. Imports nothing of the pipeline, so config.py can use it."""
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

STRIDE = 32  # timm CNN backbones downsample by 32 at their last stage, so sizes that are multiples of 32 always fit
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
HUB_MODEL = re.compile(r"hf[-_]hub:[\w.-]+/[\w.-]+(@[\w./-]+)?")


@dataclass(frozen=True)
class Rule:
    """What one flag accepts: a test, its wording (for messages and --help) and one value it rejects."""
    ok: Callable[[Any], bool]
    allowed: str
    bad: Any
    problem: str = "is not valid"
    choices: tuple = ()
    metavar: str = ""


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def distinct(items):
    return isinstance(items, tuple) and len(set(items)) == len(items)


def integer(lo, hi=None):
    if hi is None:
        return Rule(lambda v: is_int(v) and v >= lo, f"an integer >= {lo}", lo - 1, "is out of range")
    return Rule(lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]", lo - 1, "is out of range")


def number(lo, hi=None, low_open=False, high_open=False):
    """A finite number above lo (and below hi); open ends exclude the bound."""
    def ok(v):
        if not is_number(v):
            return False
        above = v > lo if low_open else v >= lo
        below = hi is None or (v < hi if high_open else v <= hi)
        return above and below
    if hi is None:
        return Rule(ok, f"a number {'>' if low_open else '>='} {lo}", lo if low_open else lo - 1, "is out of range")
    ends = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    return Rule(ok, f"a number in {ends}", lo if low_open else lo - 1, "is out of range")


def fraction():
    return number(0, 1, low_open=True, high_open=True)


def image_side():
    return Rule(lambda v: is_int(v) and v >= STRIDE and v % STRIDE == 0,
                f"an integer >= {STRIDE} and a multiple of {STRIDE} (the output stride of timm CNN backbones)",
                STRIDE + STRIDE // 2, "is out of range")


def boolean():
    return Rule(lambda v: isinstance(v, bool), "true or false (--flag / --no-flag)", "yes")


def text(empty=False):
    return Rule(lambda v: isinstance(v, str) and (empty or v.strip() != ""),
                "a text (may be empty)" if empty else "a non-empty text", None if empty else "")


def choice(options):
    return Rule(lambda v: v in options, f"one of {', '.join(options)}", "none", choices=tuple(options))


def device_name():
    return Rule(lambda v: isinstance(v, str) and DEVICE.fullmatch(v) is not None,
                "one of auto, cpu, cuda, cuda:N, mps", "gpu")


def timm_model():
    """A backbone name timm knows (timm.is_model; no weights are loaded)."""
    def ok(v):
        import timm
        return isinstance(v, str) and timm.is_model(v)
    return Rule(ok, "a timm model name, see timm.list_models()", "no_such_backbone", "is unknown")


def backbone_name():
    """A timm model name (timm.is_model) or a timm model on the Hugging Face hub, hf-hub:ORG/NAME[@REVISION]."""
    def ok(v):
        import timm
        return isinstance(v, str) and (timm.is_model(v) or HUB_MODEL.fullmatch(v) is not None)
    return Rule(ok, "a timm model name (see timm.list_models()) or hf-hub:ORG/NAME", "no_such_backbone", "is unknown")


def path_or_empty(allowed, bad, folder=False):
    """Empty or an existing file (a folder with `folder`); `allowed` says what each means."""
    exists, what = (Path.is_dir, "folder") if folder else (Path.is_file, "file")
    return Rule(lambda v: isinstance(v, str) and (v == "" or exists(Path(v))), allowed, bad, f"is not a {what}",
                metavar="PATH")


def subset(options):
    """A non-empty selection of `options` without repeats, e.g. the magnifications."""
    return Rule(lambda v: distinct(v) and len(v) > 0 and all(m in options for m in v),
                f"a non-empty subset of {','.join(options)} without repeats", (options[0], options[0]))


def alpha_list():
    return Rule(lambda v: distinct(v) and len(v) > 0 and all(is_number(a) and 0 < a < 1 for a in v),
                "levels in (0, 1) without repeats, comma-separated", (1.5,), "is out of range")


def path_list():
    return Rule(lambda v: distinct(v) and all(isinstance(p, str) and p.strip() for p in v),
                "image files or folders, comma-separated (empty: none)", ("",))


def fold_list():
    return Rule(lambda v: distinct(v) and all(is_int(k) and k >= 0 for k in v),
                "fold numbers >= 0 without repeats (empty: all folds)", (-1,))


def stage_list():
    return Rule(lambda v: distinct(v) and all(isinstance(s, str) and s for s in v),
                "stage names without repeats (empty: all stages)", ("cv", "cv"))


def name_list():
    return Rule(lambda v: distinct(v) and all(isinstance(s, str) and s for s in v),
                "run names without repeats (empty: every run of the stage)", ("a", "a"))


def stage_indices():
    return Rule(lambda v: isinstance(v, tuple) and len(v) > 0 and distinct(v) and all(is_int(k) for k in v),
                "backbone stage indices without repeats, e.g. 2 or 2,-1 (0 = first, -1 = last)", (2, 2))


def three_fractions():
    """Train/val/test shares of the fixed split: three numbers in (0, 1) summing to 1."""
    def ok(v):
        if not isinstance(v, tuple) or len(v) != 3 or not all(fraction().ok(x) for x in v):
            return False
        return math.isclose(sum(v), 1.0, abs_tol=1e-6)
    return Rule(ok, "three fractions in (0, 1) that sum to 1, e.g. 0.7,0.15,0.15", (0.7, 0.2, 0.2))
