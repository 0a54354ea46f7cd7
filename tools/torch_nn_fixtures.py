#!/usr/bin/env python3
"""Write PyTorch reference fixtures for nerve-nn's parity tests.

Losses, normalisation layers, optimizers and 20 AdamW steps of the `cnn` workload's network,
all from inputs and initial weights given by closed-form formulas (see `formula` below, which
the Rust tests mirror), so the fixture holds only results and stays small.

    pip install torch safetensors
    python3 tools/torch_nn_fixtures.py   # writes crates/nerve-nn/tests/fixtures/nn.safetensors
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "nerve-nn", "tests", "fixtures", "nn.safetensors")
torch.set_num_threads(1)
out = {}


def formula(shape, seed, scale=1.0):
    """x[i] = scale * sin(0.37 i + seed) (f32), the same in the Rust tests."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    return (scale * torch.sin(0.37 * i + seed)).float().reshape(shape)


def targets(n, c, seed):
    return torch.tensor([(i * 7 + seed) % c for i in range(n)], dtype=torch.int64)


# ---------------------------------------------------------------- losses
logits = formula((6, 5), 1.0, 2.0)
tgt = targets(6, 5, 3)
cw = formula((5,), 2.0, 0.4) + 1.0
probs = F.softmax(formula((6, 5), 3.0, 1.5), dim=1)
pred = formula((4, 3), 4.0)
goal = formula((4, 3), 5.0)
p01 = torch.sigmoid(formula((4, 3), 6.0, 2.0))
y01 = (formula((4, 3), 7.0) > 0).float()
posw = formula((3,), 8.0, 0.5) + 1.0
logp = F.log_softmax(formula((4, 3), 9.0), dim=1)
q = F.softmax(formula((4, 3), 10.0), dim=1)
tgt_ign = tgt.clone()
tgt_ign[2] = -100
logits3 = formula((2, 4, 3), 11.0)
tgt3 = torch.tensor([[0, 3, 1], [2, 2, 0]])

loss_cases = {
    "ce": (lambda x: F.cross_entropy(x, tgt), logits),
    "ce_weight": (lambda x: F.cross_entropy(x, tgt, weight=cw), logits),
    "ce_ignore": (lambda x: F.cross_entropy(x, tgt_ign), logits),
    "ce_smooth": (lambda x: F.cross_entropy(x, tgt, label_smoothing=0.1), logits),
    "ce_smooth_weight": (lambda x: F.cross_entropy(x, tgt, weight=cw, label_smoothing=0.2), logits),
    "ce_sum": (lambda x: F.cross_entropy(x, tgt, reduction="sum"), logits),
    "ce_none": (lambda x: F.cross_entropy(x, tgt, reduction="none"), logits),
    "ce_probs": (lambda x: F.cross_entropy(x, probs), logits),
    "ce_3d": (lambda x: F.cross_entropy(x, tgt3), logits3),
    "nll": (lambda x: F.nll_loss(F.log_softmax(x, 1), tgt, weight=cw), logits),
    "mse": (lambda x: F.mse_loss(x, goal), pred),
    "l1": (lambda x: F.l1_loss(x, goal), pred),
    "smooth_l1": (lambda x: F.smooth_l1_loss(x, goal, beta=0.5), pred),
    "huber": (lambda x: F.huber_loss(x, goal, delta=0.7), pred),
    "bce": (lambda x: F.binary_cross_entropy(x, y01), p01),
    "bce_logits": (lambda x: F.binary_cross_entropy_with_logits(x, y01, pos_weight=posw), pred),
    "kl_div": (lambda x: F.kl_div(x, q, reduction="batchmean"), logp),
}
for name, (f, x) in loss_cases.items():
    x = x.clone().requires_grad_(True)
    y = f(x)
    y.backward(torch.ones_like(y))
    out[f"loss.{name}.out"] = y.detach()
    out[f"loss.{name}.grad"] = x.grad

# ---------------------------------------------------------------- normalisation layers
def layer_case(name, layer, x, train=True):
    layer.train(train)
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    gy = formula(tuple(y.shape), 20.0)
    y.backward(gy)
    out[f"layer.{name}.out"] = y.detach()
    out[f"layer.{name}.grad_input"] = x.grad
    for pn, p in layer.named_parameters():
        out[f"layer.{name}.grad.{pn}"] = p.grad.clone()
    for bn, b in layer.named_buffers():
        out[f"layer.{name}.buffer.{bn}"] = b.detach().clone()


bn = nn.BatchNorm2d(3)
with torch.no_grad():
    bn.weight.copy_(formula((3,), 12.0, 0.5) + 1.0)
    bn.bias.copy_(formula((3,), 13.0, 0.5))
layer_case("bn_train", bn, formula((4, 3, 5, 5), 14.0, 2.0))
layer_case("bn_eval", bn, formula((4, 3, 5, 5), 15.0, 2.0), train=False)
ln = nn.LayerNorm(8)
with torch.no_grad():
    ln.weight.copy_(formula((8,), 16.0, 0.5) + 1.0)
    ln.bias.copy_(formula((8,), 17.0, 0.5))
layer_case("layernorm", ln, formula((2, 3, 8), 18.0, 2.0))
gn = nn.GroupNorm(2, 4)
with torch.no_grad():
    gn.weight.copy_(formula((4,), 19.0, 0.5) + 1.0)
    gn.bias.copy_(formula((4,), 21.0, 0.5))
layer_case("groupnorm", gn, formula((2, 4, 3, 3), 22.0, 2.0))
rms = nn.RMSNorm(8, eps=1e-6)
with torch.no_grad():
    rms.weight.copy_(formula((8,), 23.0, 0.5) + 1.0)
layer_case("rmsnorm", rms, formula((2, 3, 8), 24.0, 2.0))

# ---------------------------------------------------------------- optimizers
def quad_loss(p):
    c = formula((7,), 30.0, 0.5) + 1.0
    t = formula((7,), 31.0)
    return ((p - t) ** 2 * c).sum() + (p ** 4).sum() * 0.1


optimizers = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, weight_decay=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.01, weight_decay=0.01),
}
for name, make in optimizers.items():
    p = formula((7,), 32.0).clone().requires_grad_(True)
    opt = make([p])
    for _ in range(6):
        opt.zero_grad()
        quad_loss(p).backward()
        opt.step()
    out[f"optim.{name}.final"] = p.detach().clone()

# ---------------------------------------------------------------- the cnn workload, 20 AdamW steps
cnn = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10),
)
with torch.no_grad():
    for k, (name, p) in enumerate(cnn.named_parameters()):
        fan_in = p.shape[1] * math.prod(p.shape[2:]) if p.dim() > 1 else 32
        p.copy_(formula(tuple(p.shape), 40.0 + k, 1.0 / math.sqrt(fan_in)))
opt = torch.optim.AdamW(cnn.parameters(), lr=1e-3, weight_decay=0.01)
losses = []
for step in range(20):
    # Two batches, alternating: a run that learns steadily (fresh random labels every step
    # make the loss jump around, and Adam then amplifies rounding in near-zero gradients).
    x = formula((8, 1, 28, 28), 100.0 + step % 2)
    y = targets(8, 10, step % 2)
    loss = F.cross_entropy(cnn(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
out["cnn.adamw.losses"] = torch.tensor(losses, dtype=torch.float64)

# ---------------------------------------------------------------- scaled dot-product attention
q = formula((2, 3, 5, 4), 50.0)
k = formula((2, 3, 6, 4), 51.0)
v = formula((2, 3, 6, 3), 52.0)
bool_mask = formula((5, 6), 53.0) > -0.5
float_mask = formula((2, 1, 5, 6), 54.0, 0.5)
sdpa_cases = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool_mask": dict(attn_mask=bool_mask),
    "float_mask": dict(attn_mask=float_mask, scale=0.3),
}
for name, kw in sdpa_cases.items():
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    y = F.scaled_dot_product_attention(qq, kk, vv, **kw)
    y.backward(formula(tuple(y.shape), 55.0))
    out[f"sdpa.{name}.out"] = y.detach()
    for n, t in (("q", qq), ("k", kk), ("v", vv)):
        out[f"sdpa.{name}.grad_{n}"] = t.grad

# ---------------------------------------------------------------- multi-head attention
for name, batch_first in (("mha_bf", True), ("mha_sf", False)):
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    with torch.no_grad():
        for k, (pn, p) in enumerate(mha.named_parameters()):
            p.copy_(formula(tuple(p.shape), 80.0 + k, 0.4))
    shape_q, shape_kv = ((2, 5, 8), (2, 6, 8)) if batch_first else ((5, 2, 8), (6, 2, 8))
    qx = formula(shape_q, 90.0).requires_grad_(True)
    kx = formula(shape_kv, 91.0).requires_grad_(True)
    vx = formula(shape_kv, 92.0).requires_grad_(True)
    if batch_first:
        kpm = torch.tensor([[False] * 5 + [True], [False] * 6])
        am = formula((5, 6), 93.0) > 0.7
        y, _ = mha(qx, kx, vx, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    else:
        y, _ = mha(qx, kx, vx, attn_mask=formula((5, 6), 94.0, 0.5), need_weights=False)
    y.backward(formula(tuple(y.shape), 95.0))
    out[f"{name}.out"] = y.detach()
    for n, t in (("q", qx), ("k", kx), ("v", vx)):
        out[f"{name}.grad_{n}"] = t.grad
    for pn, p in mha.named_parameters():
        out[f"{name}.grad.{pn}"] = p.grad

# ---------------------------------------------------------------- a GPT (the zoo's `gpt`)
class Mlp(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc, self.proj = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, w, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(w)
        self.mlp = Mlp(w)

    def forward(self, x):
        t = x.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Gpt(nn.Module):
    def __init__(self, vocab, ctx, layers, heads, w):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, w), nn.Embedding(ctx, w)
        self.h = nn.ModuleList([Block(w, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(w)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for b in self.h:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.T


gpt = Gpt(11, 8, 2, 2, 8)
with torch.no_grad():
    for k, (pn, p) in enumerate(gpt.named_parameters()):
        p.copy_(formula(tuple(p.shape), 100.0 + k, 0.3))
ids = torch.tensor([[(i * 5 + j) % 11 for i in range(7)] for j in range(3)])
logits = gpt(ids)
loss = F.cross_entropy(logits.reshape(-1, 11), ((ids + 1) % 11).reshape(-1))
loss.backward()
out["gpt.logits"] = logits.detach()
out["gpt.loss"] = loss.detach()
for pn, p in gpt.named_parameters():
    out[f"gpt.grad.{pn}"] = p.grad

# ---------------------------------------------------------------- a ViT (the zoo's `vit`)
class VitBlock(nn.Module):
    def __init__(self, w, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(w)
        self.mlp = nn.Module()
        self.mlp.fc, self.mlp.proj = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp.proj(F.gelu(self.mlp.fc(self.ln_2(x))))


class Vit(nn.Module):
    def __init__(self, c, image, patch, w, layers, heads, classes):
        super().__init__()
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, w))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(c, w, patch, stride=patch)
        self.blocks = nn.ModuleList([VitBlock(w, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, classes)

    def forward(self, x):
        p = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), p], 1) + self.pos_embed
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h[:, 0]))


vit = Vit(2, 8, 4, 8, 2, 2, 5)
with torch.no_grad():
    for k, (pn, p) in enumerate(vit.named_parameters()):
        p.copy_(formula(tuple(p.shape), 120.0 + k, 0.3))
images = formula((3, 2, 8, 8), 130.0)
vlogits = vit(images)
vloss = F.cross_entropy(vlogits, torch.tensor([0, 3, 4]))
vloss.backward()
out["vit.logits"] = vlogits.detach()
for pn, p in vit.named_parameters():
    out[f"vit.grad.{pn}"] = p.grad

# ---------------------------------------------------------------- recurrent layers
rnn_cases = {
    "lstm": (nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True), True),
    "gru": (nn.GRU(3, 4, num_layers=2, bidirectional=True), False),
    "rnn": (nn.RNN(3, 4, num_layers=1, nonlinearity="tanh"), False),
}
for name, (layer, batch_first) in rnn_cases.items():
    with torch.no_grad():
        for k, (pn, p) in enumerate(layer.named_parameters()):
            p.copy_(formula(tuple(p.shape), 60.0 + k, 0.5))
    x = formula((2, 5, 3) if batch_first else (5, 2, 3), 70.0).requires_grad_(True)
    dirs = 2 if layer.bidirectional else 1
    h0 = formula((layer.num_layers * dirs, 2, 4), 71.0, 0.5).requires_grad_(True)
    if name == "lstm":
        c0 = formula((layer.num_layers * dirs, 2, 4), 72.0, 0.5).requires_grad_(True)
        y, (hn, cn) = layer(x, (h0, c0))
        loss = (y * formula(tuple(y.shape), 73.0)).sum() + (hn * formula(tuple(hn.shape), 74.0)).sum() \
            + (cn * formula(tuple(cn.shape), 75.0)).sum()
    else:
        y, hn = layer(x, h0)
        loss = (y * formula(tuple(y.shape), 73.0)).sum() + (hn * formula(tuple(hn.shape), 74.0)).sum()
    loss.backward()
    out[f"rnn.{name}.out"] = y.detach()
    out[f"rnn.{name}.hn"] = hn.detach()
    if name == "lstm":
        out[f"rnn.{name}.cn"] = cn.detach()
        out[f"rnn.{name}.grad_c0"] = c0.grad
    out[f"rnn.{name}.grad_x"] = x.grad
    out[f"rnn.{name}.grad_h0"] = h0.grad
    for pn, p in layer.named_parameters():
        out[f"rnn.{name}.grad.{pn}"] = p.grad

# ---------------------------------------------------------------- a PyTorch checkpoint for nerve
# A small model with every kind of state (conv, BatchNorm buffers incl. the int64 counter,
# linear), trained a few steps so the running statistics are not the defaults; its
# state_dict is saved exactly as PyTorch users save one, with an input and the eval output.
torch.manual_seed(0)
small = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(64, 3))
sopt = torch.optim.SGD(small.parameters(), lr=0.1)
for step in range(3):
    loss = F.cross_entropy(small(formula((5, 1, 8, 8), 200.0 + step)), targets(5, 3, step))
    sopt.zero_grad()
    loss.backward()
    sopt.step()
small.eval()
ckpt = os.path.join(os.path.dirname(OUT), "torch_small_cnn.safetensors")
save_file({k: v.contiguous() for k, v in small.state_dict().items()}, ckpt)
with torch.no_grad():
    out["ckpt.input"] = formula((2, 1, 8, 8), 300.0)
    out["ckpt.output"] = small(out["ckpt.input"])

os.makedirs(os.path.dirname(OUT), exist_ok=True)
save_file({k: v.detach().contiguous() for k, v in out.items()}, OUT)
print(f"wrote {len(out)} tensors to {os.path.normpath(OUT)}")
