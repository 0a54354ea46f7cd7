#!/usr/bin/env python3
"""nerve against PyTorch, side by side: runs nerve-bench and tools/bench/torch_bench.py on the same
workloads, interleaved (nerve, then PyTorch, workload by workload, for several rounds, so that a
noisy neighbour hits both), and prints a Markdown table of the ratios.

    cargo build --release -p nerve-bench
    python3 tools/bench/compare.py [workload ...] [--rounds 3] [--min-secs 3] [--threads N]
                                   [--torch-compile]

Each workload runs alone in its own process on both sides (both benchmarks do that themselves),
so the peak memory columns are the workload's own. The ratio of a round is nerve's throughput
over PyTorch's in that round; the table gives the median ratio over the rounds and its range.
"""
import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def parse(out):
    """{(workload, impl): (throughput, unit, peak_rss_mb or None)} from benchmark lines."""
    lines = {}
    for line in out.splitlines():
        if not line.startswith("workload="):
            continue
        f = dict(kv.split("=", 1) for kv in line.split())
        peak = float(f["peak_rss_mb"]) if "peak_rss_mb" in f else None
        lines[(f["workload"], f["impl"])] = (float(f["throughput"]), f["unit"], peak)
    return lines


def bench(cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed with exit code {r.returncode}")
    return parse(r.stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workloads", nargs="*")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-secs", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--torch-compile", action="store_true",
                   help="also run the PyTorch side through torch.compile where it applies (slow to start)")
    p.add_argument("--nerve-bench", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "nerve-bench"))
    args = p.parse_args()
    if not os.path.exists(args.nerve_bench):
        sys.exit(f"error: {args.nerve_bench} not found: run `cargo build --release -p nerve-bench`")
    names = args.workloads or subprocess.run([args.nerve_bench, "--list"], stdout=subprocess.PIPE,
                                             text=True, check=True).stdout.split()
    common = ["--min-secs", str(args.min_secs), "--threads", str(args.threads)]
    results = {}  # (workload, impl) -> list of (throughput, peak)
    ratios = {}  # (workload, impl) -> list of ratios against pytorch in the same round
    units = {}
    for r in range(args.rounds):
        for name in names:
            ours = bench([args.nerve_bench, name] + common)
            torch_cmd = [sys.executable, os.path.join(HERE, "torch_bench.py"), name] + common
            theirs = bench(torch_cmd)
            if args.torch_compile:
                theirs.update(bench(torch_cmd + ["--compile"]))
            for key, (thr, unit, peak) in list(ours.items()) + list(theirs.items()):
                results.setdefault(key, []).append((thr, peak))
                units[key[0]] = unit
                if key[1].startswith("pytorch"):
                    continue
                for base in ["pytorch", "pytorch-compile"]:
                    if (name, base) in theirs:
                        ratios.setdefault((key, base), []).append(thr / theirs[(name, base)][0])
            print(f"# round {r + 1}/{args.rounds} {name}: " + ", ".join(
                f"{k[1]} {v[0]:.2f}" for k, v in list(ours.items()) + list(theirs.items())),
                file=sys.stderr, flush=True)
    compiled = args.torch_compile
    print(f"| workload | impl | throughput (median of {args.rounds}) | unit | peak RSS MB | "
          f"× PyTorch (median) | range |" + (" × torch.compile | range |" if compiled else ""))
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if compiled else ""))
    for key in sorted(results, key=lambda k: (names.index(k[0]) if k[0] in names else 99, k[1])):
        thr = statistics.median(t for t, _ in results[key])
        peaks = [p for _, p in results[key] if p is not None]
        peak = f"{max(peaks):.0f}" if peaks else "—"
        cells = []
        for base in ["pytorch"] + (["pytorch-compile"] if compiled else []):
            rs = ratios.get((key, base))
            cells.append(f"{statistics.median(rs):.2f}×" if rs else "—")
            cells.append(f"{min(rs):.2f}–{max(rs):.2f}" if rs else "—")
        print(f"| {key[0]} | {key[1]} | {thr:.2f} | {units[key[0]]} | {peak} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
