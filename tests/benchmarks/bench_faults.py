"""Fault injection: SIGKILL `python main.py --demo --stages cv` at random moments, resume with --resume until it exits 0,
and compare every run's metrics.json (every number but wall times) with an uninterrupted reference run.

python tests/benchmarks/bench_faults.py [--kills N] [--seed S] [--keep] [--work DIR] [-- main.py flags]
main.py flags default to --folds 0,1 --epochs 3. Each kill starts from a copy of the same analyze/split output and
lands a random (seeded) time into the stage, up to the reference run's stage time. Last line:
`faults: K kills, S survived identical, L lost`.
"""
import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from utils.helpers import read_json_or_none  # noqa: E402

DEFAULT_FLAGS = ["--folds", "0,1", "--epochs", "3"]
MAX_RESUMES = 3
STAGE_LINE, END_LINE = ">>> stage:", "Stage wall time"
MISSES = 3


def command(out_dir, data_root, flags, stages="cv", resume=False):
    cmd = [sys.executable, str(ROOT / "main.py"), "--demo", "--stages", stages, "--data-root", str(data_root),
           "--output-dir", str(out_dir), *flags]
    return cmd + ["--resume"] if resume else cmd


def environment(threads):
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def start(cmd, log_file, env):
    with open(log_file, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def logged(log_file, line):
    return line in Path(log_file).read_text(errors="replace")


def run_to_end(cmd, log_file, env):
    """(exit code, seconds from its first stage line to its stage time summary) of one uninterrupted run."""
    proc = start(cmd, log_file, env)
    marks = {}
    while proc.poll() is None:
        for line in (STAGE_LINE, END_LINE):
            if line not in marks and logged(log_file, line):
                marks[line] = time.time()
        time.sleep(0.05)
    end = marks.get(END_LINE, time.time())
    return proc.returncode, end - marks.get(STAGE_LINE, end)


def kill_after(cmd, delay, log_file, env):
    """Run `cmd` and SIGKILL it `delay` seconds after its first stage began; False when its stages ended before."""
    proc = start(cmd, log_file, env)
    while proc.poll() is None and not logged(log_file, STAGE_LINE):
        time.sleep(0.05)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return not logged(log_file, END_LINE)


def last_line(log_file):
    lines = [x.strip() for x in Path(log_file).read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:110] if lines else "(nothing logged yet: start-up)"


def resume_until_done(cmd, logs, env):
    """(exit code, attempts) of --resume runs until one exits 0, at most MAX_RESUMES."""
    rc = None
    for attempt in range(1, MAX_RESUMES + 1):
        rc, _ = run_to_end(cmd, logs / f"resume_{attempt}.log", env)
        if rc == 0:
            return rc, attempt
    return rc, MAX_RESUMES


def leaves(obj, prefix=""):
    """{dotted key: value} of every number and text in a JSON tree, wall times left out."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() if "seconds" not in key
                for k, v in leaves(value, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in leaves(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


def metrics_of(out_dir):
    """{run/split: flattened metrics.json, or None where it does not parse}."""
    runs = Path(out_dir, "runs")
    found = {str(p.parent.relative_to(runs)): read_json_or_none(p) for p in sorted(runs.glob("*/*/metrics.json"))}
    return {run: None if m is None else leaves(m) for run, m in found.items()}


def same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def differences(reference, got):
    """Lines naming each run whose metrics are missing, damaged or differ from the reference."""
    lines = []
    for run, ref in reference.items():
        have = got.get(run)
        if have is None:
            lines.append(f"{run}/metrics.json {'unreadable' if run in got else 'missing'}")
            continue
        keys = [k for k in sorted(set(ref) | set(have)) if not same(ref.get(k), have.get(k))]
        if keys:
            k = keys[0]
            lines.append(f"{run}/metrics.json: {len(keys)} value(s) differ, e.g. {k} {ref.get(k)} vs {have.get(k)}")
    return lines


def leftovers(out_dir):
    """Temp files and run locks still on disk after the resumed run ended."""
    return sorted(str(p.relative_to(out_dir)) for p in Path(out_dir).rglob("*") if ".tmp" in p.name or p.name == ".lock")


def make_data(work, preset):
    from preprocess.synthetic import make_synthetic
    return make_synthetic(Path(work) / "data", preset=preset, seed=0)


def prepare(work, data_root, flags, env):
    """The shared analyze/split output and the reference cv run on a copy of it: (base, reference, stage seconds)."""
    base, ref = work / "base", work / "reference"
    rc, _ = run_to_end(command(base, data_root, flags, stages="analyze,split"), work / "base.log", env)
    if rc != 0:
        raise SystemExit(f"analyze/split failed (exit {rc}); see {work / 'base.log'}")
    shutil.copytree(base, ref)
    rc, seconds = run_to_end(command(ref, data_root, flags), work / "reference.log", env)
    if rc != 0:
        raise SystemExit(f"the reference run failed (exit {rc}); see {work / 'reference.log'}")
    return base, ref, seconds


def fresh_copy(base, out):
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)


def kill_somewhere(cmd, base, out, seconds, rng, logs, env):
    """SIGKILL a run on a fresh copy of `base` a random time into its stage (up to the reference's `seconds`); a run
    that ends first is redone with an earlier kill. Returns the delay, or None when every try ended first."""
    high = seconds
    for _ in range(MISSES):
        delay = rng.uniform(0.0, high)
        fresh_copy(base, out)
        if kill_after(cmd, delay, logs / "killed.log", env):
            return delay
        high = delay
    return None


def trial(i, seconds, rng, work, base, data_root, flags, env, reference):
    """One kill on a fresh copy of the base output, then --resume; None when no kill landed."""
    out, logs = work / f"kill_{i}", work / f"kill_{i}_logs"
    logs.mkdir()
    delay = kill_somewhere(command(out, data_root, flags), base, out, seconds, rng, logs, env)
    if delay is None:
        print(f"kill {i}: the run ended before every drawn moment; no kill")
        return None
    running = last_line(logs / "killed.log")
    rc, attempts = resume_until_done(command(out, data_root, flags, resume=True), logs, env)
    problems = differences(reference, metrics_of(out)) if rc == 0 else [
        f"--resume exited {rc} {attempts}x: {last_line(logs / f'resume_{attempts}.log')}"]
    left = leftovers(out)
    verdict = "identical" if not problems else "LOST: " + "; ".join(problems)
    print(f"kill {i}: {delay:.1f} s into the stage, during: {running}")
    print(f"        -> {attempts} resume(s), {verdict}" + (f" | left on disk: {', '.join(left)}" if left else ""))
    return not problems


def run_bench(kills, seed, flags, work, data_root=None, preset="demo", threads=1):
    """(kills delivered, identical, lost) over `kills` trials."""
    work = Path(work)
    env = environment(threads)
    data_root = data_root or make_data(work, preset)
    base, ref, seconds = prepare(work, data_root, flags, env)
    reference = metrics_of(ref)
    if not reference or None in reference.values():
        raise SystemExit(f"the reference run wrote no readable metrics.json under {ref / 'runs'}")
    print(f"reference: {', '.join(reference)}; its stage took {seconds:.1f} s")
    rng = random.Random(seed)
    outcomes = [trial(i, seconds, rng, work, base, data_root, flags, env, reference) for i in range(kills)]
    delivered = [o for o in outcomes if o is not None]
    return len(delivered), sum(delivered), len(delivered) - sum(delivered)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--work", default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--data-root", default=None, help="existing BreakHis-like tree (default: a new demo tree)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("flags", nargs="*", help="main.py flags after --")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    k, s, lost = run_bench(args.kills, args.seed, args.flags or DEFAULT_FLAGS, work, args.data_root, threads=args.threads)
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"faults: {k} kills, {s} survived identical, {lost} lost")

if __name__ == "__main__":
    main()
