#!/usr/bin/env python3
"""PyTorch reference for nerve-bench: the same workloads, protocol and output lines.

    pip install torch transformers gguf   # transformers + gguf for the *-generate workloads
    python3 tools/bench/torch_bench.py [workload ...] [--min-secs 3] [--threads N]

Run it right after `cargo run --release -p nerve-bench` on the same machine and compare the
throughputs as ratios (tools/bench/compare.py runs both, interleaved, and prints the ratios).
Every workload runs alone in a child process, so each line ends with that workload's own
` peak_rss_mb=` (the child's peak resident memory, torch's own footprint included).
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

EW_N = 1 << 24

# --compile: these workloads' models go through torch.compile (inductor), impl=pytorch-compile.
COMPILE = False
COMPILABLE = {"mlp", "cnn", "gpt", "vit", "lstm", "mamba"}
# --bf16-autocast: the training workloads under torch.autocast("cpu", torch.bfloat16),
# impl=pytorch-bf16-autocast. Not a workload of the spec (all are f32): it shows what a lower
# precision buys PyTorch on this machine.
AUTOCAST = False


def fwd(model):
    """The model's forward, compiled when --compile is given."""
    return torch.compile(model) if COMPILE else model


def sgemm(n):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: torch.mm(a, b)


def add():
    a, b = torch.randn(EW_N), torch.randn(EW_N)
    return lambda: a + b


def gelu():
    a = torch.randn(EW_N)
    return lambda: torch.nn.functional.gelu(a, approximate="tanh")


def train_step(model, x, classes):
    n = x.shape[0]
    y = torch.tensor([(i * 7) % classes for i in range(n)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    run = fwd(model)

    def step():
        loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def char_lm_step(forward, params, batch, seq, lr):
    """A training step of a character LM over 65 symbols on one fixed batch: next-symbol
    cross-entropy on every position, AdamW (weight decay 0.01)."""
    ids = torch.tensor([(i * 7 + i // 13) % 65 for i in range(batch * seq)]).reshape(batch, seq)
    targets = ((ids + 1) % 65).reshape(-1)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    run = fwd(forward)

    def step():
        loss = torch.nn.functional.cross_entropy(run(ids).reshape(-1, 65), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def mlp():
    nn = torch.nn
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    return train_step(model, torch.randn(128, 784), 10)


def cnn():
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))
    return train_step(model, torch.randn(64, 1, 28, 28), 10)


def gpt():
    nn, F = torch.nn, torch.nn.functional

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
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(65, 128), nn.Embedding(128, 128)
            self.h = nn.ModuleList([Block(128, 4) for _ in range(4)])
            self.ln_f = nn.LayerNorm(128)

        def forward(self, ids):
            x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
            for b in self.h:
                x = b(x)
            return self.ln_f(x) @ self.wte.weight.T

    model = Gpt()
    return char_lm_step(model, model.parameters(), 16, 128, 3e-4)


def vit():
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, w, heads):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(w), nn.LayerNorm(w)
            self.attn = nn.MultiheadAttention(w, heads, batch_first=True)
            self.fc, self.proj = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

        def forward(self, x):
            h = self.ln_1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.proj(F.gelu(self.fc(self.ln_2(x))))

    class Vit(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 128))
            self.pos_embed = nn.Parameter(torch.zeros(1, 65, 128))
            self.proj = nn.Conv2d(3, 128, 4, stride=4)
            self.blocks = nn.ModuleList([Block(128, 4) for _ in range(4)])
            self.norm, self.head = nn.LayerNorm(128), nn.Linear(128, 10)

        def forward(self, x):
            p = self.proj(x).flatten(2).transpose(1, 2)
            h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), p], 1) + self.pos_embed
            for b in self.blocks:
                h = b(h)
            return self.head(self.norm(h[:, 0]))

    return train_step(Vit(), torch.randn(32, 3, 32, 32), 10)


def lstm():
    nn = torch.nn
    emb, rnn, head = nn.Embedding(65, 64), nn.LSTM(64, 256, batch_first=True), nn.Linear(256, 65)
    params = list(emb.parameters()) + list(rnn.parameters()) + list(head.parameters())
    return char_lm_step(lambda ids: head(rnn(emb(ids))[0]), params, 32, 64, 1e-3)


def mamba():
    """Mamba LM with the selective scan as mamba_ssm's `selective_scan_ref`: exp(Δ·A) and Δ·B·u
    for all steps at once, then a Python loop over time for the recurrence (mamba_ssm's CUDA
    kernels do not run on the CPU, so this is what PyTorch eager is)."""
    nn, F = torch.nn, torch.nn.functional

    def selective_scan(u, delta, A, B, C, D):  # batch-first: u, delta [b, l, d]; B, C [b, l, n]
        dA = torch.exp(delta.unsqueeze(-1) * A)  # [b, l, d, n]
        dBu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
        # unbind, not dA[:, t]: the backward of L selects would build L full-size gradients.
        dAs, dBus, Cs = dA.unbind(1), dBu.unbind(1), C.unbind(1)
        h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
        ys = []
        for t in range(u.shape[1]):
            h = dAs[t] * h + dBus[t]
            ys.append(torch.einsum("bdn,bn->bd", h, Cs[t]))
        return torch.stack(ys, 1) + u * D

    class Mixer(nn.Module):
        def __init__(self, d_model, d_state=16, d_conv=4, expand=2):
            super().__init__()
            di, self.n, self.r = expand * d_model, d_state, -(-d_model // 16)
            self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
            self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
            self.x_proj = nn.Linear(di, self.r + 2 * d_state, bias=False)
            self.dt_proj = nn.Linear(self.r, di)
            self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(di, 1))
            self.D = nn.Parameter(torch.ones(di))
            self.out_proj = nn.Linear(di, d_model, bias=False)

        def forward(self, h):
            x, z = self.in_proj(h).chunk(2, dim=-1)
            x = F.silu(self.conv1d(x.transpose(1, 2))[..., :h.shape[1]]).transpose(1, 2)
            dt, B, C = torch.split(self.x_proj(x), [self.r, self.n, self.n], -1)
            delta = F.softplus(self.dt_proj(dt))
            y = selective_scan(x, delta, -torch.exp(self.A_log), B, C, self.D)
            return self.out_proj(y * F.silu(z))

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.mixer, self.norm = Mixer(d), nn.RMSNorm(d, eps=1e-5)

        def forward(self, x):
            return x + self.mixer(self.norm(x))

    class MambaLM(nn.Module):
        def __init__(self, vocab=65, d=128, layers=4):
            super().__init__()
            self.embedding = nn.Embedding(vocab, d)
            self.layers = nn.ModuleList([Block(d) for _ in range(layers)])
            self.norm_f = nn.RMSNorm(d, eps=1e-5)

        def forward(self, ids):
            x = self.embedding(ids)
            for layer in self.layers:
                x = layer(x)
            return self.norm_f(x) @ self.embedding.weight.T

    model = MambaLM()
    return char_lm_step(model, model.parameters(), 8, 128, 1e-3)


def smollm2_file():
    """The SmolLM2 GGUF: $NERVE_SMOLLM2_GGUF, else where `nerve data get smollm2` puts it."""
    default = os.path.join(os.environ.get("NERVE_DATA_DIR", os.path.expanduser("~/.cache/nerve/data")),
                           "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return os.environ.get("NERVE_SMOLLM2_GGUF", default)


def greedy(model, ids, new):
    """Greedy decoding of exactly `new` tokens with the key/value cache (transformers)."""
    return lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  use_cache=True, pad_token_id=0)


def smollm2_generate():
    """transformers' LlamaForCausalLM from the GGUF (dequantised to f32), as the workload says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, name = os.path.split(os.path.abspath(smollm2_file()))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    return greedy(model, ids, 64)


def gpt2_generate():
    """GPT-2 small with random weights (transformers), 16 prompt tokens, 64 new."""
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config()).eval()
    ids = torch.tensor([[(i * 7919) % 50257 for i in range(16)]])
    return greedy(model, ids, 64)


def minilm_embed():
    """all-MiniLM-L6-v2 (transformers BertModel from the folder `nerve data get minilm` fills),
    32 x 128 seeded random ids, full mask; forward, mean pooling, L2 normalisation."""
    from transformers import BertModel
    default = os.path.join(os.environ.get("NERVE_DATA_DIR", os.path.expanduser("~/.cache/nerve/data")), "minilm")
    model = BertModel.from_pretrained(os.environ.get("NERVE_MINILM_DIR", default)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (32, 128), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones(32, 128, dtype=torch.long)

    def step():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(e, p=2, dim=1)
    return step


def lora_finetune():
    """SmolLM2 f32 base frozen, PEFT LoRA r 8 alpha 16 on q_proj and v_proj, batch 4 x 128 seeded
    random ids, causal LM loss on every position, AdamW lr 1e-4 on the adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, name = os.path.split(os.path.abspath(smollm2_file()))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            weight_decay=0.01)

    def step():
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def softmax():
    a = torch.randn(4096, 1024)
    return lambda: torch.softmax(a, -1)


# (name, unit, work per step, setup, trains): training workloads run with gradients on.
WORKLOADS = [
    ("mlp", "samples/s", 128, mlp, True),
    ("cnn", "samples/s", 64, cnn, True),
    ("gpt", "tokens/s", 16 * 128, gpt, True),
    ("vit", "samples/s", 32, vit, True),
    ("lstm", "tokens/s", 32 * 64, lstm, True),
    ("mamba", "tokens/s", 8 * 128, mamba, True),
    ("sgemm-1024", "GFLOP/s", 2 * 1024**3 / 1e9, lambda: sgemm(1024), False),
    ("sgemm-4096", "GFLOP/s", 2 * 4096**3 / 1e9, lambda: sgemm(4096), False),
    ("add-16m", "GB/s", 3 * 4 * EW_N / 1e9, add, False),
    ("gelu-16m", "Gelem/s", EW_N / 1e9, gelu, False),
    ("softmax-4096x1024", "Gelem/s", 4096 * 1024 / 1e9, softmax, False),
    ("gpt2-generate", "new_tokens/s", 64, gpt2_generate, False),
    ("smollm2-generate", "new_tokens/s", 64, smollm2_generate, False),
    ("minilm-embed", "sequences/s", 32, minilm_embed, False),
    ("lora-finetune", "tokens/s", 4 * 128, lora_finetune, True),
]


def run(name, unit, work, setup, trains, min_secs, report_rss):
    step = setup()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST and trains)
    with torch.set_grad_enabled(trains), autocast:
        for _ in range(3):
            step()
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < min_secs or len(times) < 3:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    # ru_maxrss is in KiB on Linux.
    rss = f" peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}" if report_rss else ""
    impl = "pytorch-compile" if COMPILE else "pytorch"
    if AUTOCAST and trains:
        impl += "-bf16-autocast"
    print(f"workload={name} impl={impl} step_ms={med * 1e3:.3f} "
          f"throughput={work / med:.2f} unit={unit}{rss}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workloads", nargs="*")
    p.add_argument("--min-secs", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--in-process", action="store_true",
                   help="run the workloads in this process (no peak_rss_mb)")
    p.add_argument("--compile", action="store_true",
                   help="the small training workloads only, their models through torch.compile (impl=pytorch-compile)")
    p.add_argument("--bf16-autocast", action="store_true",
                   help="training workloads under torch.autocast(cpu, bfloat16) (impl=pytorch-bf16-autocast; not f32)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: this workload, with its peak
    args = p.parse_args()
    global COMPILE, AUTOCAST
    COMPILE, AUTOCAST = args.compile, args.bf16_autocast
    known = [w[0] for w in WORKLOADS]
    for name in args.workloads:
        if name not in known:
            sys.exit(f"error: unknown workload '{name}' (known: {' '.join(known)})")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name, unit, work, setup, trains in WORKLOADS:
        if args.one is not None:
            if name == args.one:
                run(name, unit, work, setup, trains, args.min_secs, True)
            continue
        if args.workloads and name not in args.workloads:
            continue
        if args.compile and name not in COMPILABLE:
            continue
        if args.in_process:
            run(name, unit, work, setup, trains, args.min_secs, False)
            continue
        child = [sys.executable, os.path.abspath(__file__), "--one", name,
                 "--min-secs", str(args.min_secs), "--threads", str(args.threads)]
        if args.compile:
            child.append("--compile")
        if args.bf16_autocast:
            child.append("--bf16-autocast")
        if subprocess.run(child).returncode != 0:
            sys.exit(f"error: workload {name} failed")


if __name__ == "__main__":
    main()
