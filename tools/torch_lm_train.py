#!/usr/bin/env python3
"""PyTorch reference trainer for nerve's character-level language models.

The same recipe as `nerve train --model lstm|gru|gpt|mamba` (and the same held-out measure as
`nerve eval`), so the validation losses can be compared:

    pip install torch
    nerve data get shakespeare
    python3 tools/torch_lm_train.py --model gpt --steps 2000
    nerve train --model gpt --steps 2000 && nerve eval runs/gpt-shakespeare

Recipe (nerve's defaults): vocabulary = sorted distinct characters; the last 10% held out;
random windows of `seq + 1` characters; AdamW (lr 1e-3, weight decay 0.01, PyTorch's betas),
constant rate, gradients clipped to norm 1.0; batch 32; seq 64 (lstm, gru) or 128 (gpt, mamba).
Mamba's selective scan is the paper's recurrence in a Python loop (mamba_ssm's kernels need CUDA).
Evaluations every 250 steps use 128 held-out windows at start_i = i*(len-seq-1)//128; the
final figure is the mean loss over every non-overlapping held-out window.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class CharRnn(nn.Module):
    def __init__(self, cell, vocab, embedding=64, hidden=256, layers=1):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(self.rnn(self.embedding(ids))[0])


class Block(nn.Module):
    def __init__(self, w, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, heads, batch_first=True)
        self.fc, self.proj = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class Gpt(nn.Module):
    """nerve's Gpt: learned positions, pre-LN blocks, tied embedding, N(0, 0.02²) embeddings."""

    def __init__(self, vocab, context=128, layers=4, heads=4, width=128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        nn.init.normal_(self.wte.weight, 0.0, 0.02)
        nn.init.normal_(self.wpe.weight, 0.0, 0.02)
        self.h = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for b in self.h:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.T


def selective_scan(u, delta, A, B, C, D):
    """The paper's recurrence (mamba_ssm's selective_scan_ref), batch-first: u, delta [b, l, d];
    A [d, n]; B, C [b, l, n]; a Python loop over time."""
    dA = torch.exp(delta.unsqueeze(-1) * A)
    dBu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    dAs, dBus, Cs = dA.unbind(1), dBu.unbind(1), C.unbind(1)
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        h = dAs[t] * h + dBus[t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cs[t]))
    return torch.stack(ys, 1) + u * D


class Mixer(nn.Module):
    """mamba_ssm's Mamba block with its initialisation (dt_init "random", A_log = ln(1..N))."""

    def __init__(self, d_model, n_layers, d_state=16, d_conv=4, expand=2):
        super().__init__()
        di, self.n, self.r = expand * d_model, d_state, -(-d_model // 16)
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
        self.x_proj = nn.Linear(di, self.r + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.r, di)
        nn.init.uniform_(self.dt_proj.weight, -self.r ** -0.5, self.r ** -0.5)
        dt = torch.exp(torch.rand(di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d_model, bias=False)
        with torch.no_grad():
            self.out_proj.weight /= math.sqrt(n_layers)

    def forward(self, h):
        x, z = self.in_proj(h).chunk(2, dim=-1)
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :h.shape[1]]).transpose(1, 2)
        dt, B, C = torch.split(self.x_proj(x), [self.r, self.n, self.n], -1)
        delta = F.softplus(self.dt_proj(dt))
        y = selective_scan(x, delta, -torch.exp(self.A_log), B, C, self.D)
        return self.out_proj(y * F.silu(z))


class MambaLayer(nn.Module):
    def __init__(self, d, n_layers):
        super().__init__()
        self.mixer, self.norm = Mixer(d, n_layers), nn.RMSNorm(d, eps=1e-5)

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class Mamba(nn.Module):
    """nerve's MambaLm: embedding N(0, 0.02²), pre-RMSNorm residual layers, tied output."""

    def __init__(self, vocab, d=128, layers=4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        nn.init.normal_(self.embedding.weight, 0.0, 0.02)
        self.layers = nn.ModuleList([MambaLayer(d, layers) for _ in range(layers)])
        self.norm_f = nn.RMSNorm(d, eps=1e-5)

    def forward(self, ids):
        x = self.embedding(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x) @ self.embedding.weight.T


def windows(ids, starts, seq):
    x = torch.stack([ids[s:s + seq] for s in starts])
    y = torch.stack([ids[s + 1:s + seq + 1] for s in starts])
    return x, y


@torch.no_grad()
def mean_loss(model, ids, starts, seq, batch):
    model.eval()
    total = 0.0
    for i in range(0, len(starts), batch):
        x, y = windows(ids, starts[i:i + batch], seq)
        logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="sum").item()
    model.train()
    return total / (len(starts) * seq)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["lstm", "gru", "gpt", "mamba"], required=True)
    p.add_argument("--data", default=os.path.expanduser(
        "~/.cache/nerve/data/shakespeare/shakespeare.txt"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--init", help="start from these weights (a nerve model.safetensors)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    text = open(a.data, encoding="utf-8").read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    n_train = round(len(ids) * 0.9)
    train, val = ids[:n_train], ids[n_train:]
    seq = a.seq_len or (64 if a.model in ("lstm", "gru") else 128)
    if a.model == "gpt":
        model = Gpt(len(chars))
    elif a.model == "mamba":
        model = Mamba(len(chars))
    else:
        model = CharRnn(a.model, len(chars))
    if a.init:
        from safetensors.torch import load_file
        sd = {k.replace("mlp.", "").replace("backbone.", ""): v
              for k, v in load_file(a.init).items()}
        model.load_state_dict(sd, strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    span = len(val) - seq - 1
    val_starts = [i * span // a.eval_windows for i in range(a.eval_windows)]
    print(f"torch {a.model}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"{len(train)} train / {len(val)} held-out characters, vocabulary {len(chars)}, "
          f"{a.steps} steps of {a.batch_size}x{seq}")
    t0 = time.time()
    losses = []
    for step in range(1, a.steps + 1):
        starts = torch.randint(0, len(train) - seq, (a.batch_size,)).tolist()
        x, y = windows(train, starts, seq)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, len(chars)), y.reshape(-1))
        loss.backward()
        if a.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad_norm)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % a.eval_every == 0 or step == a.steps:
            v = mean_loss(model, val, val_starts, seq, a.batch_size)
            tl = sum(losses) / len(losses)
            losses = []
            el = time.time() - t0
            print(f"step {step:>6}/{a.steps}  train loss {tl:.4f}  val loss {v:.4f}  "
                  f"{step * a.batch_size * seq / el:.0f} tok/s  {el:.0f}s", flush=True)
    n = (len(val) - 1) // seq
    full = mean_loss(model, val, [i * seq for i in range(n)], seq, 64)
    print(f"held-out loss {full:.4f} nats/char ({full / math.log(2):.3f} bits/char) over "
          f"{n} windows of {seq}; {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
