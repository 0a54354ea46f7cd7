#!/usr/bin/env python3
"""Load a checkpoint written by `nerve train` into the PyTorch twin of its network with
`load_state_dict(strict=True)` and report its accuracy on the scikit-learn digits set embedded
in nerve (all 1,797 images, normalised with the checkpoint's mean and std).

    pip install torch safetensors numpy
    cargo run --release -p nerve-cli -- train          # writes runs/cnn-digits/
    python3 tools/check_nerve_checkpoint.py runs/cnn-digits/model.safetensors
"""
import gzip
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file


def build(kind, dims, classes):
    c, h, w = dims
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, classes))
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Linear(128, classes))


def main(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    dims = [int(d) for d in meta["nerve.sample_dims"].split(",")]
    model = build(meta["nerve.model"], dims, int(meta["nerve.classes"]))
    model.load_state_dict(load_file(path), strict=True)
    model.eval()
    csv = os.path.join(os.path.dirname(__file__), "..", "crates", "nerve-data", "data", "digits.csv.gz")
    rows = np.loadtxt(gzip.open(csv), delimiter=",")
    x = torch.tensor(rows[:, :64] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = (x - float(meta["nerve.mean"])) / float(meta["nerve.std"])
    y = torch.tensor(rows[:, 64], dtype=torch.int64)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(json.dumps({"checkpoint": path, "load_state_dict": "strict ok", "digits_accuracy_all_1797": round(acc, 4)}))


if __name__ == "__main__":
    main(sys.argv[1])
