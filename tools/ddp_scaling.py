#!/usr/bin/env python3
"""Step time of `nerve train` in one process and on two MPI ranks, for each model of the zoo.

Usage: python3 tools/ddp_scaling.py [NERVE_BINARY] [--ranks 2] [--steps 40] [--models mlp,gpt]

NERVE_BINARY defaults to target/release/nerve (build it with
`cargo build --release -p nerve-cli --features mpi`). For each model it trains the same
global batch twice: one process with the machine's threads and batch R*B, then `mpirun -np R`
with batch B per rank (each rank gets cores/R threads). It prints, from metrics.jsonl, the
mean milliseconds per optimizer step after the first log window, the gradient bytes
all-reduced per step and the milliseconds the all-reduce took.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

# model -> (per-rank batch, extra arguments)
MODELS = {
    "mlp": (64, ["--epochs", "10"]),
    "cnn": (64, ["--epochs", "10"]),
    "vit": (64, ["--epochs", "10"]),
    "lstm": (32, ["--data", "shakespeare"]),
    "gru": (32, ["--data", "shakespeare"]),
    "gpt": (32, ["--data", "shakespeare"]),
    "mamba": (32, ["--data", "shakespeare"]),
    "ddpm": (64, ["--data", "digits"]),
}


def step_ms(run_dir):
    """Mean ms per step from the first train record to the last (no evaluation between), and
    the median all-reduce ms of those records."""
    recs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [r for r in recs if r["kind"] == "train"]
    first, last = train[0], train[-1]
    ms = 1e3 * (last["time_s"] - first["time_s"]) / (last["step"] - first["step"])
    ar = [r["allreduce_ms"] for r in train[1:] if "allreduce_ms" in r]
    return ms, (statistics.median(ar) if ar else None)


def main():
    args = sys.argv[1:]
    nerve = "target/release/nerve"
    if args and not args[0].startswith("--"):
        nerve = args.pop(0)
    opts = dict(zip(args[::2], args[1::2]))
    ranks = int(opts.get("--ranks", 2))
    steps = int(opts.get("--steps", 40))
    models = opts.get("--models", ",".join(MODELS)).split(",")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    tmp = tempfile.mkdtemp(prefix="nerve-ddp-")
    print(f"| model | global batch | MB all-reduced / step | 1 process ms/step | {ranks} ranks ms/step | speed-up | all-reduce ms |")
    print("|---|---|---|---|---|---|---|")
    for m in models:
        b, extra = MODELS[m]
        common = ["train", "--model", m, *extra, "--log-every", "10", "--eval-every", "100000",
                  "--no-progress", "--quiet"]
        # Classifiers train by epochs: stop after `steps`; the others take --steps.
        common += ["--stop-after", str(steps)] if "--epochs" in extra else ["--steps", str(steps)]
        one, many = os.path.join(tmp, f"{m}-1"), os.path.join(tmp, f"{m}-{ranks}")
        subprocess.run([nerve, *common, "--batch-size", str(ranks * b), "--out", one],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["mpirun", "--oversubscribe", "-np", str(ranks), nerve, *common,
                              "--distributed", "--batch-size", str(b), "--out", many],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        ms1, _ = step_ms(one)
        msn, ar = step_ms(many)
        params = subprocess.run(
            [sys.executable, "-c",
             "import sys,json,struct;f=open(sys.argv[1],'rb');n=struct.unpack('<Q',f.read(8))[0];"
             "h=json.loads(f.read(n));import math;"
             "print(sum(math.prod(v['shape']) for k,v in h.items() if k!='__metadata__'))",
             os.path.join(one, "model.safetensors")], capture_output=True, text=True).stdout.strip()
        mb = 4 * int(params) / 1e6
        print(f"| {m} | {ranks * b} | {mb:.2f} | {ms1:.1f} | {msn:.1f} | {ms1 / msn:.2f}× | {ar:.2f} |")


if __name__ == "__main__":
    main()
