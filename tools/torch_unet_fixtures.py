#!/usr/bin/env python3
"""Write PyTorch reference fixtures for the zoo's diffusion U-Net and DDPM schedules.

A plain PyTorch twin of nerve-models' `UNet` (crates/nerve-models/src/unet.rs), with the same
parameter names, in a tiny configuration; weights and inputs from closed-form formulas (see
`formula`, which the Rust tests mirror). The fixture holds the state dict, the output, and the
gradient of every parameter w.r.t. sum(out * formula weights), plus DDPM schedule numbers.

    pip install torch safetensors
    python3 tools/torch_unet_fixtures.py   # writes crates/nerve-models/tests/fixtures/unet.safetensors
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "nerve-models", "tests", "fixtures",
                   "unet.safetensors")
torch.set_num_threads(1)
out = {}

# The tiny configuration the Rust test builds (UNetConfig field names).
CONFIG = dict(in_channels=2, sample_size=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=2,
              norm_groups=4, time_embed_dim=16, attention=True, attention_heads=2, num_classes=3,
              dropout=0.0)


def formula(shape, seed, scale=1.0):
    """x[i] = scale * sin(0.37 i + seed) (f32), the same in the Rust tests."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    return (scale * torch.sin(0.37 * i + seed)).float().reshape(shape)


def timestep_embedding(t, dim):
    """Sinusoidal features [B, dim]: sin in even, cos in odd columns, frequency
    10000^(-2*floor(i/2)/dim) (nerve's `sinusoidal_encoding` layout)."""
    i = torch.arange(dim)
    freqs = 10000.0 ** (-(i // 2 * 2).double() / dim)
    a = t.double()[:, None] * freqs[None]
    return torch.where(i % 2 == 0, a.sin(), a.cos()).float()


class TimestepEmbedding(nn.Module):
    def __init__(self, cin, temb):
        super().__init__()
        self.linear_1 = nn.Linear(cin, temb)
        self.linear_2 = nn.Linear(temb, temb)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb_act):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(emb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    def __init__(self, c, heads, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)
        o = self.attn(t, t, t, need_weights=False)[0]
        return x + o.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetLevel(nn.Module):
    def __init__(self, resnets, attentions, downsample=None, upsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.downsample = downsample
        self.upsample = upsample

    def block(self, j, x, emb_act):
        h = self.resnets[j](x, emb_act)
        return self.attentions[j](h) if len(self.attentions) else h


class UNet(nn.Module):
    def __init__(self, in_channels, sample_size, base_channels, channel_mult, num_res_blocks,
                 norm_groups, time_embed_dim, attention, attention_heads, num_classes, dropout):
        super().__init__()
        self.base = base_channels
        temb, g, levels = time_embed_dim, norm_groups, len(channel_mult)

        def attn(c, n):
            return [AttentionBlock(c, attention_heads, g) for _ in range(n)] if attention else []

        def res(cin, cout):
            return ResBlock(cin, cout, temb, g, dropout)

        self.time_embedding = TimestepEmbedding(base_channels, temb)
        self.class_embedding = nn.Embedding(num_classes + 1, temb) if num_classes else None
        self.null = num_classes
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        skips, ch = [base_channels], base_channels
        down = []
        for i in range(levels):
            out_c = base_channels * channel_mult[i]
            resnets = []
            for _ in range(num_res_blocks):
                resnets.append(res(ch, out_c))
                ch = out_c
                skips.append(ch)
            last = i + 1 == levels
            ds = None
            if not last:
                skips.append(ch)
                ds = Downsample(ch)
            down.append(UNetLevel(resnets, attn(ch, num_res_blocks) if last else [], downsample=ds))
        self.down_blocks = nn.ModuleList(down)
        self.mid_block = UNetLevel([res(ch, ch), res(ch, ch)], attn(ch, 1))
        up = []
        for i in reversed(range(levels)):
            out_c = base_channels * channel_mult[i]
            resnets = []
            for _ in range(num_res_blocks + 1):
                resnets.append(res(ch + skips.pop(), out_c))
                ch = out_c
            up.append(UNetLevel(resnets, attn(ch, num_res_blocks + 1) if i + 1 == levels else [],
                                upsample=Upsample(ch) if i > 0 else None))
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = nn.GroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(self, x, t, y=None):
        emb = self.time_embedding(timestep_embedding(t, self.base))
        if self.class_embedding is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.null, dtype=torch.int64)
            emb = emb + self.class_embedding(y)
        emb_act = F.silu(emb)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for j in range(len(level.resnets)):
                h = level.block(j, h, emb_act)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                skips.append(h)
        mid = self.mid_block
        h = mid.resnets[0](h, emb_act)
        if len(mid.attentions):
            h = mid.attentions[0](h)
        h = mid.resnets[1](h, emb_act)
        for level in self.up_blocks:
            for j in range(len(level.resnets)):
                h = level.block(j, torch.cat([h, skips.pop()], 1), emb_act)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ---------------------------------------------------------------- the U-Net
unet = UNet(**CONFIG)
names = [n for n, _ in unet.named_parameters()]
with torch.no_grad():
    for k, (pn, p) in enumerate(unet.named_parameters()):
        p.copy_(formula(tuple(p.shape), 200.0 + k, 0.3))
x = formula((3, 2, 8, 8), 400.0)
t = torch.tensor([3, 250, 999])
y = torch.tensor([0, 2, 3])  # 3 = the null class
eps = unet(x, t, y)
(eps * formula(tuple(eps.shape), 401.0)).sum().backward()
for pn, p in unet.state_dict().items():
    out[f"unet.state.{pn}"] = p
out["unet.out"] = eps.detach()
for pn, p in unet.named_parameters():
    out[f"unet.grad.{pn}"] = p.grad
with torch.no_grad():
    out["unet.out_uncond"] = unet(x, t, None)

# ---------------------------------------------------------------- DDPM schedules (float64)
T = 1000
betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
acp = torch.cumprod(1.0 - betas, 0)
acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
out["ddpm.linear.betas"] = betas
out["ddpm.linear.alphas_cumprod"] = acp
out["ddpm.linear.posterior_variance"] = betas * (1.0 - acp_prev) / (1.0 - acp)


def alpha_bar(tau, s=0.008):
    return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2


cos_betas = torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                         dtype=torch.float64)
out["ddpm.cosine.betas"] = cos_betas
out["ddpm.cosine.alphas_cumprod"] = torch.cumprod(1.0 - cos_betas, 0)

x0 = formula((3, 1, 4, 4), 500.0)
noise = formula((3, 1, 4, 4), 501.0)
qt = torch.tensor([0, 500, 999])
a = acp[qt][:, None, None, None]
out["ddpm.q_sample"] = a.sqrt().float() * x0 + (1 - a).sqrt().float() * noise

os.makedirs(os.path.dirname(OUT), exist_ok=True)
save_file({k: v.detach().contiguous() for k, v in out.items()}, OUT,
          metadata={"unet.parameter_order": ",".join(names)})
print(f"wrote {len(out)} tensors to {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes)")
