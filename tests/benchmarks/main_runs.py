"""What the benchmarks that drive main.py share: the calibrated synthetic tree of a seed, and one main.py call that
stops the benchmark with the output's tail when it fails."""
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from preprocess.synthetic import make_synthetic  # noqa: E402


def tree(args, seed, difficulty=None):
    """The `full` preset's 82 patients at --per-mag images per magnification under --work, generated once."""
    difficulty = difficulty or args.difficulty
    root = Path(args.work) / f"data_full_{args.per_mag}_{seed}_{difficulty}"
    if not root.exists():
        make_synthetic(root, preset="full", seed=seed, difficulty=difficulty, counts=None, per_mag=args.per_mag,
                       size=(175, 115))
    return root


def run_main(cmd, what="", threads=None):
    """Run one main.py command (with `threads` torch threads when given); its wall time in seconds."""
    env = None if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:])
        sys.exit(f"main.py failed{' ' + what if what else ''} (exit {done.returncode})")
    return time.time() - start
