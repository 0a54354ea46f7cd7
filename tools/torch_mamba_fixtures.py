#!/usr/bin/env python3
"""Write PyTorch reference fixtures for nerve's Mamba (crates/nerve-nn/src/mamba.rs and
crates/nerve-models/src/mamba.rs).

The reference is a plain PyTorch implementation of the Mamba paper's recurrence (Gu & Dao,
2023): the selective scan as a Python loop over time, like mamba_ssm's `selective_scan_ref`,
in batch-first layout; no mamba_ssm package. Everything runs in float64 from inputs and
weights given by the closed-form `formula` (rounded to float32, so the Rust tests can use the
same values in f32 exactly), and the fixture holds:

- `scan.{sp,plain}.*`: inputs, output and the gradient of every input of `selective_scan`
  (with softplus and delta_bias; without either), for `loss = sum(y * w)`;
- `block.*`: a MambaBlock (mixer): its state_dict, input, output and the gradients of the
  input and of every parameter;
- `lm.*`: a small Mamba LM: state_dict, logits, cross-entropy loss and every gradient.

    pip install torch safetensors
    python3 tools/torch_mamba_fixtures.py  # writes crates/nerve-nn/tests/fixtures/mamba.safetensors
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "nerve-nn", "tests", "fixtures",
                   "mamba.safetensors")
torch.set_num_threads(1)
out = {}


def formula(shape, seed, scale=1.0):
    """x[i] = scale * sin(0.37 i + seed), rounded to float32 (as the Rust tests), as float64."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    return (scale * torch.sin(0.37 * i + seed)).float().double().reshape(shape)


def selective_scan(u, delta, A, B, C, D, delta_bias=None, delta_softplus=False):
    """The paper's recurrence, batch-first: u, delta [b, l, d]; A [d, n]; B, C [b, l, n];
    D [d] -> y [b, l, d]. h_t = exp(dt A) h_{t-1} + dt B_t u_t; y_t = C_t h_t + D u_t."""
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = F.softplus(delta)
    b, l, d = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        dt = delta[:, t, :, None]  # [b, d, 1]
        h = torch.exp(dt * A) * h + dt * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(ys, 1)


class Mamba(nn.Module):
    """mamba_ssm's `Mamba` mixer (same parameter names), with the reference scan."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank=None):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d_model, bias=False)

    def forward(self, hidden):
        l = hidden.shape[1]
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :l]).transpose(1, 2)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], -1)
        delta = dt @ self.dt_proj.weight.T
        A = -torch.exp(self.A_log)
        y = selective_scan(x, delta, A, B, C, self.D, self.dt_proj.bias, True)
        return self.out_proj(y * F.silu(z))


class Block(nn.Module):
    def __init__(self, d_model, **kw):
        super().__init__()
        self.mixer = Mamba(d_model, **kw)
        self.norm = nn.RMSNorm(d_model, eps=1e-5)

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class MambaLM(nn.Module):
    """mamba_ssm's MambaLMHeadModel: backbone.{embedding, layers, norm_f}, tied lm_head."""

    def __init__(self, vocab, d_model, n_layers, **kw):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.embedding = nn.Embedding(vocab, d_model)
        self.backbone.layers = nn.ModuleList([Block(d_model, **kw) for _ in range(n_layers)])
        self.backbone.norm_f = nn.RMSNorm(d_model, eps=1e-5)

    def forward(self, ids):
        x = self.backbone.embedding(ids)
        for layer in self.backbone.layers:
            x = layer(x)
        return self.backbone.norm_f(x) @ self.backbone.embedding.weight.T


def set_weights(model):
    """Every parameter from formula(), seeded by its index in named_parameters()."""
    with torch.no_grad():
        for k, (_, p) in enumerate(model.named_parameters()):
            p.copy_(formula(p.shape, 100.0 + k, 0.3))


# ---------------------------------------------------------------- the selective scan
# Odd sizes: 37 steps cross nerve's 32-step chunks, 19 channels fill one 16-lane block and
# part of another.
b, l, d, n = 2, 37, 19, 3
for case, softplus in [("sp", True), ("plain", False)]:
    inputs = {
        "u": formula((b, l, d), 1.0),
        "delta": formula((b, l, d), 2.0, 0.5) if softplus else formula((b, l, d), 2.0, 0.2) + 0.3,
        "A": -torch.exp(formula((d, n), 3.0, 0.5)),
        "B": formula((b, l, n), 4.0),
        "C": formula((b, l, n), 5.0),
        "D": formula((d,), 6.0),
    }
    if softplus:
        inputs["delta_bias"] = formula((d,), 7.0, 0.3) - 1.0
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = selective_scan(*(leaves[k] for k in ["u", "delta", "A", "B", "C", "D"]),
                       delta_bias=leaves.get("delta_bias"), delta_softplus=softplus)
    (y * formula(y.shape, 8.0)).sum().backward()
    for k, v in inputs.items():
        out[f"scan.{case}.{k}"] = v
        out[f"scan.{case}.grad.{k}"] = leaves[k].grad
    out[f"scan.{case}.y"] = y.detach()

# ---------------------------------------------------------------- one MambaBlock (mixer)
block = Mamba(10, d_state=3, d_conv=3, expand=2, dt_rank=3).double()
set_weights(block)
x = formula((2, 35, 10), 11.0).requires_grad_(True)
y = block(x)
(y * formula(y.shape, 12.0)).sum().backward()
out["block.x"] = x.detach()
out["block.out"] = y.detach()
out["block.grad.x"] = x.grad
for name, p in block.named_parameters():
    out[f"block.state.{name}"] = p.detach().float()
    out[f"block.grad.{name}"] = p.grad

# ---------------------------------------------------------------- a small Mamba LM
lm = MambaLM(11, 8, 2, d_state=4, d_conv=4, expand=2).double()
set_weights(lm)
ids = torch.tensor([[(i * 5 + j) % 11 for i in range(9)] for j in range(2)])
logits = lm(ids)
loss = F.cross_entropy(logits.reshape(-1, 11), ((ids + 1) % 11).reshape(-1))
loss.backward()
out["lm.logits"] = logits.detach()
out["lm.loss"] = loss.detach()
for name, p in lm.named_parameters():
    out[f"lm.state.{name}"] = p.detach().float()
    out[f"lm.grad.{name}"] = p.grad

# Results in float32 except the scan's (float64, for the f64 check).
save_file({k: (v if k.startswith("scan.") else v.float()).detach().contiguous()
           for k, v in out.items()}, OUT)
print(f"wrote {len(out)} tensors to {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes)")
