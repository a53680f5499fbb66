"""The house: imports run only downward through the floors, no cycles, no project import hidden in a function."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rules", "config", "utils", "preprocess", "backbones", "stages", "main")


FLOORS = {"rules": 0, "config": 1, "utils": 2, "preprocess": 3, "backbones": 3, "stages.training": 4, "stages.tuning": 5,
          "stages.inference": 5, "stages.report": 5, "stages.planning": 5, "main": 6}


def package(module):
    """The room a module lives in: its top-level package, or its package under stages/."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "stages" else parts[0]


def floor(module):
    """rules 0, config 1, utils 2, preprocess and backbones 3, training (a run and the stages that train runs) 4,
    tuning, inference, report and planning 5, main 6."""
    return FLOORS[package(module)]


def modules():
    files = [p for p in ROOT.rglob("*.py") if p.parts[len(ROOT.parts)] in {f"{n}.py" for n in PACKAGES} | set(PACKAGES)]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imports(path, name):
    """(imported project module, inside a function?) for every import statement of one file."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([node.module] if node.module else []))
            targets = [base]
        found += [(t, node.col_offset > 0) for t in targets if t.split(".")[0] in PACKAGES]
    return found


def graph():
    mods = modules()
    return {name: imports(path, name) for name, path in mods.items()}


def test_no_import_runs_upward_or_sideways_between_packages():
    wrong = []
    for name, targets in graph().items():
        for target, _ in targets:
            same_package = package(target) == package(name)
            if floor(target) > floor(name) or (floor(target) == floor(name) and not same_package):
                wrong.append(f"{name} -> {target}")
    assert not wrong


def test_no_project_import_inside_a_function():
    hidden = [f"{name} -> {target}" for name, targets in graph().items() for target, nested in targets if nested]
    assert not hidden


def test_no_cycle():
    edges = {name: {t for t, _ in targets} for name, targets in graph().items()}
    seen, stack = set(), []

    def visit(node):
        assert node not in stack, " -> ".join(stack + [node])
        if node in seen:
            return
        stack.append(node)
        for nxt in edges.get(node, ()):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in edges:
        visit(node)


def test_the_reference_model_name_is_spelled_once():
    spelled = [f"{name}:{i}" for name, path in modules().items()
               for i, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"[\"']mmnet[\"']", line)]
    assert len(spelled) == 1, spelled


def test_every_file_is_short():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) >= 350}
    assert not long


def test_no_two_modules_share_a_file_name():
    names = {}
    for name, path in modules().items():
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(name)
    assert {n: m for n, m in names.items() if len(m) > 1} == {}


def test_every_stage_module_sits_on_a_floor():
    assert all(package(name) in FLOORS for name in modules() if name != "stages")
