"""Write every report table of tests/test_report.py's fabricated runs to a folder, or compare two such folders byte
for byte (a refactor of the report must leave both equal).

python tests/benchmarks/report_tables.py write DIR     # DIR/tables: every csv, paper md/tex and report_notes.txt
python tests/benchmarks/report_tables.py compare A B   # exit 1 when a file differs or is missing on one side

Latency is fixed at 1 ms and the runs live in one scratch folder, so two writes of the same code are identical.
"""
import filecmp
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import stages.report.efficiency as efficiency  # noqa: E402
from config import Config  # noqa: E402
from stages.report.report import run_report  # noqa: E402
from tests.test_report import MAGS, fabricate  # noqa: E402

SCRATCH = Path(tempfile.gettempdir()) / "mmnet_report_tables"


def write(dest):
    out = SCRATCH / "output"
    shutil.rmtree(SCRATCH, ignore_errors=True)
    efficiency.time_forward = lambda *a, **k: 1.0
    cfg = replace(Config(), output_dir=str(out), device="cpu", bootstrap=40, magnifications=MAGS, synthetic=True)
    fabricate(cfg, with_checkpoints=True)
    run_report(cfg)
    shutil.rmtree(dest / "tables", ignore_errors=True)
    shutil.copytree(out / "tables", dest / "tables")


def files(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def compare(a, b):
    a, b = a / "tables", b / "tables"
    left, right = files(a), files(b)
    same = [f for f in sorted(left & right) if filecmp.cmp(a / f, b / f, shallow=False)]
    for f in sorted(left ^ right):
        print(f"only in {a if f in left else b}: {f}")
    for f in sorted((left & right) - set(same)):
        print(f"differs: {f}")
    print(f"compare: {len(same)} identical, {len(left ^ right)} on one side only, {len(left & right) - len(same)} differ")
    return 0 if len(same) == len(left | right) else 1


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]))
    else:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
