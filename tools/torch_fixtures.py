#!/usr/bin/env python3
"""Write PyTorch reference fixtures for nerve-core's op parity tests.

For every case: inputs, the output, a random upstream gradient and the gradients of every
floating-point input, all f32 (indices int64), into one safetensors file. The Rust test
(crates/nerve-core/tests/torch_parity.rs) runs the same op in nerve and compares.

    pip install torch safetensors
    python3 tools/torch_fixtures.py   # writes crates/nerve-core/tests/fixtures/ops.safetensors
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(0)
OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "nerve-core", "tests", "fixtures",
                   "ops.safetensors")

tensors = {}


def rn(*s):
    return torch.randn(*s)


def pos(*s):
    return torch.rand(*s) * 1.5 + 0.5


def idx(hi, *s):
    return torch.randint(0, hi, s)


def case(name, fn, *inputs):
    ins = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*ins)
    if isinstance(out, tuple):
        out = out[0]
    g = torch.randn_like(out)
    diff = [x for x in ins if x.requires_grad]
    grads = torch.autograd.grad(out, diff, g, allow_unused=True) if out.requires_grad else []
    for i, x in enumerate(inputs):
        tensors[f"{name}.in{i}"] = x.contiguous()
    tensors[f"{name}.out"] = out.detach().contiguous()
    tensors[f"{name}.gout"] = g.contiguous()
    k = 0
    for i, x in enumerate(ins):
        if x.requires_grad:
            gr = grads[k]
            k += 1
            tensors[f"{name}.grad{i}"] = (gr if gr is not None else torch.zeros_like(x)).contiguous()


# element-wise
for name, f, gen in [
    ("neg", torch.neg, rn), ("abs", torch.abs, rn), ("exp", torch.exp, rn), ("log", torch.log, pos),
    ("sqrt", torch.sqrt, pos), ("rsqrt", torch.rsqrt, pos), ("reciprocal", torch.reciprocal, pos),
    ("sin", torch.sin, rn), ("cos", torch.cos, rn), ("tanh", torch.tanh, rn),
    ("sigmoid", torch.sigmoid, rn), ("relu", torch.relu, rn),
    ("leaky_relu", lambda x: F.leaky_relu(x, 0.01), rn), ("elu", lambda x: F.elu(x, 1.0), rn),
    ("gelu", F.gelu, rn), ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), rn),
    ("silu", F.silu, rn), ("softplus", F.softplus, lambda *s: rn(*s) * 10),
    ("clamp", lambda x: x.clamp(-0.5, 0.7), rn), ("powf", lambda x: x.pow(1.7), pos),
]:
    case(name, f, gen(4, 37))

for name, f, ga, gb in [
    ("add", torch.add, rn, rn), ("sub", torch.sub, rn, rn), ("mul", torch.mul, rn, rn),
    ("div", torch.div, rn, pos), ("pow", torch.pow, pos, rn),
    ("maximum", torch.maximum, rn, rn), ("minimum", torch.minimum, rn, rn),
]:
    case(name, f, ga(3, 1, 5), gb(4, 1))
case("where_cond", lambda a, b: torch.where(a > b, a, b * 2), rn(3, 4), rn(4))
case("masked_fill", lambda a, b: a.masked_fill(b > 0, 0.25), rn(3, 4), rn(4))

# reductions
x = rn(3, 4, 5)
case("sum_dims", lambda x: x.sum((0, 2)), x)
case("sum_keep", lambda x: x.sum(1, keepdim=True), x)
case("mean", lambda x: x.mean(-1), x)
case("var", lambda x: x.var(1), x)
case("var_biased", lambda x: x.var((0, 2), correction=0, keepdim=True), x)
case("std", lambda x: x.std(), x)
case("amax", lambda x: x.amax((1, 2)), x)
case("max_dim", lambda x: x.max(1)[0], x)
case("min_dim", lambda x: x.min(-1, keepdim=True)[0], x)
case("logsumexp", lambda x: x.logsumexp(2), x)
case("norm", lambda x: torch.linalg.vector_norm(x, 2, dim=(0, 1)), x)
case("softmax0", lambda x: x.softmax(0), x)
case("softmax2", lambda x: x.softmax(-1), x)
case("log_softmax1", lambda x: x.log_softmax(1), x)
case("cumsum", lambda x: x.cumsum(1), x)
tensors["argmax.in0"] = x
tensors["argmax.out"] = x.argmax(1)

# matmul family
case("matmul_2d", torch.matmul, rn(5, 7), rn(7, 3))
case("matmul_batched", torch.matmul, rn(2, 1, 5, 7), rn(3, 7, 4))
case("matmul_vec", torch.matmul, rn(2, 5, 7), rn(7))
case("matmul_t", lambda a, b: a.t() @ b.t(), rn(7, 5), rn(3, 7))

# shape / joins / indexing
case("cat", lambda a, b: torch.cat([a, b], 1), rn(2, 3, 4), rn(2, 1, 4))
case("stack", lambda a, b: torch.stack([a, b], -1), rn(2, 3), rn(2, 3))
case("flip", lambda a: a.flip((0, 2)), rn(2, 3, 4))
case("roll", lambda a: a.roll((1, -1), (0, 2)), rn(2, 3, 4))
case("pad", lambda a: F.pad(a, (1, 2, 0, 1), value=0.5), rn(2, 3, 4))
case("index_select", lambda a, i: a.index_select(1, i), rn(3, 5), torch.tensor([4, 0, 4, 2]))
case("gather", lambda a, i: a.gather(1, i), rn(3, 5), idx(5, 3, 4))
case("scatter_add", lambda a, s, i: a.scatter_add(0, i, s), rn(3, 5), rn(2, 5), idx(3, 2, 5))
case("embedding", lambda w, i: F.embedding(i, w), rn(10, 4), idx(10, 2, 3))

# convolutions and pooling (NCHW)
case("conv2d", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, dilation=1, groups=2),
     rn(2, 4, 7, 6), rn(6, 2, 3, 2), rn(6))
case("conv2d_dil", lambda x, w: F.conv2d(x, w, None, stride=1, padding=2, dilation=2),
     rn(1, 3, 6, 6), rn(2, 3, 3, 3))
case("conv1d", lambda x, w, b: F.conv1d(x, w, b, stride=1, padding=1), rn(2, 3, 9), rn(4, 3, 3),
     rn(4))
case("conv_transpose2d",
     lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=1),
     rn(2, 3, 4, 5), rn(3, 2, 3, 3), rn(2))
case("max_pool2d", lambda x: F.max_pool2d(x, 2, 2), rn(2, 3, 6, 7))
case("max_pool2d_pad", lambda x: F.max_pool2d(x, 3, 2, padding=1, ceil_mode=True), rn(1, 2, 7, 7))
case("avg_pool2d", lambda x: F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False),
     rn(2, 2, 7, 6))
case("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (3, 2)), rn(2, 3, 7, 5))
case("upsample_nearest", lambda x: F.interpolate(x, size=(5, 7), mode="nearest"), rn(1, 2, 3, 4))

os.makedirs(os.path.dirname(OUT), exist_ok=True)
save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, OUT)
print(f"wrote {len(tensors)} tensors to {os.path.normpath(OUT)}")
