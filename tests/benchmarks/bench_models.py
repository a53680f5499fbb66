"""Cost of MMNet, every ablation and every baseline: params, thop MACs/FLOPs and CPU latency of one tuple.

python tests/benchmarks/bench_models.py [--backbone NAME (default: config.py)] [--image-size 224] [--threads 2] [--csv PATH]
MACs are thop multiply-accumulates; FLOPs = 2 x MACs. ResNet50 reads one image of the tuple, the others all four.
"""
import argparse
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backbones import build_model, model_config  # noqa: E402
from config import MAGNIFICATIONS, Config  # noqa: E402
from stages.report.efficiency import profile_model, time_forward  # noqa: E402


def variants(backbone):
    mm = dict(backbone=backbone)
    rows = [
        ("resnet50_transfer", "resnet50_transfer", dict(mag="40X", backbone="resnet50")),
        ("mmnet", "mmnet", mm),
        ("mmnet_separate_backbones", "mmnet", dict(mm, shared_backbone=False)),
        ("mmnet_no_spatial", "mmnet", dict(mm, use_spatial=False)),
        ("mmnet_no_channel", "mmnet", dict(mm, use_channel=False)),
        ("mmnet_no_hma", "mmnet", dict(mm, use_hma=False)),
        ("mmnet_no_cmf", "mmnet", dict(mm, use_cmf=False)),
    ]
    rows += [(f"mmnet_only_{m}", "mmnet", dict(mm, use_mags=(m,))) for m in MAGNIFICATIONS]
    rows += [("simple_concat", "simple_concat", mm)]
    rows += [(f"single_{m}", "single_mag", dict(mm, mag=m)) for m in MAGNIFICATIONS]
    return rows


def interleaved_times(models, image_size, threads, rounds, repeats):
    """Median ms per model, timing every model in turn each round so background load hits all of them alike."""
    torch.set_num_threads(threads)
    x = torch.randn(1, len(MAGNIFICATIONS), 3, image_size, image_size)
    mask = torch.ones(1, len(MAGNIFICATIONS), dtype=torch.bool)
    device = torch.device("cpu")
    times = {name: [] for name in models}
    for r in range(rounds):
        print(f"timing round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for name, model in models.items():
            times[name].append(time_forward(model, (x, mask), device, repeats=repeats, warmup=1))
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=Config().backbone)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model per round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds over all models, interleaved against CPU noise")
    parser.add_argument("--csv", default="")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = replace(Config(), pretrained=False)
    models = {name: build_model(kind, **asdict(model_config(base, kind, 7, **kw))).eval()
              for name, kind, kw in variants(args.backbone)}
    print("counting MACs ...", file=sys.stderr, flush=True)
    stats = {name: profile_model(m, len(MAGNIFICATIONS), args.image_size, "cpu", args.threads, repeats=1)
             for name, m in models.items()}
    times = interleaved_times(models, args.image_size, args.threads, args.rounds, args.repeats)
    rows = []
    for name, s in stats.items():
        backbone = "resnet50" if name == "resnet50_transfer" else args.backbone
        rows.append(dict(model=name, backbone=backbone, params_m=s["params"] / 1e6,
                         trainable_params_m=s["trainable_params"] / 1e6, macs_g=s["macs_g"], flops_g=s["flops_g"],
                         cpu_ms=times[name], threads=s["threads"], image_size=args.image_size))
    table = pd.DataFrame(rows)
    ref = table.set_index("model").loc["resnet50_transfer"]
    table["macs_vs_resnet50"] = table["macs_g"] / ref["macs_g"]
    table["params_vs_resnet50"] = table["params_m"] / ref["params_m"]
    table["ms_vs_resnet50"] = table["cpu_ms"] / ref["cpu_ms"]
    print(f"CPU, batch 1 (one 4-magnification tuple), {args.threads} threads, image {args.image_size}; "
          f"MACs from thop, FLOPs = 2 x MACs; cpu_ms = median over {args.rounds} interleaved rounds of {args.repeats} forwards")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    mm = table.set_index("model").loc["mmnet"]
    print(f"\nMMNet targets: MACs {mm['macs_g']:.2f} G <= {0.5 * ref['macs_g']:.2f} G: {mm['macs_g'] <= 0.5 * ref['macs_g']} | "
          f"params {mm['params_m']:.2f} M <= {0.5 * ref['params_m']:.2f} M: {mm['params_m'] <= 0.5 * ref['params_m']} | "
          f"latency {mm['cpu_ms']:.1f} ms <= ResNet50 {ref['cpu_ms']:.1f} ms: {mm['cpu_ms'] <= ref['cpu_ms']}")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
