"""Reference LoRA training runs with transformers + PEFT for nerve's parity tests.

    pip install torch transformers peft safetensors gguf
    python3 tools/peft_lora_fixtures.py                          # tiny Llama (committed)
    python3 tools/peft_lora_fixtures.py --smollm2 FILE.gguf --text shakespeare.txt

Both runs: PEFT `LoraConfig(r, lora_alpha, target_modules=["q_proj", "v_proj"],
lora_dropout=0)` on a `LlamaForCausalLM`, every `lora_A` overwritten by the formula below
(so nerve can start from the same adapter without shipping it), `lora_B` zero as PEFT
initialises it, `torch.optim.AdamW(trainable, lr, weight_decay=0.01)`, 10 steps, each on its
own batch, loss = mean next-token cross-entropy over every position. Writes to
crates/nerve-models/tests/fixtures/:

- lora_tiny.safetensors: the batches, the loss of each step, and every adapter tensor after the
  10 steps under PEFT's saved names (`base_model.model.<module>.lora_A.weight`); the base model
  is llama_tiny.safetensors (tools/torch_llama_fixtures.py).
- lora_smollm2.safetensors (with --smollm2): SmolLM2-135M-Instruct read from the GGUF file
  (transformers dequantises it with gguf-py), batches 4 x 64 tokens of the text, the step losses
  and two adapter tensors after training.

The metadata holds r, lora_alpha, lr and the steps.
"""

import argparse
import math
import os

import torch
from safetensors.torch import load_file, save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "nerve-models", "tests", "fixtures")
TARGETS = ["q_proj", "v_proj"]
STEPS = 10


def formula_a(k, r, n_in):
    """lora_A of the k-th adapted module (module order): values in (-1/sqrt(n), 1/sqrt(n))."""
    i = torch.arange(r, dtype=torch.int64).reshape(r, 1)
    j = torch.arange(n_in, dtype=torch.int64).reshape(1, n_in)
    v = ((i * 131 + j * 71 + k * 29) % 97).double() / 97.0 - 0.5
    return (v * (2.0 / math.sqrt(n_in))).float()


def train(model, r, alpha, lr, batches):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, cfg)
    k = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                a = m.lora_A["default"].weight
                a.copy_(formula_a(k, a.shape[0], a.shape[1]))
                k += 1
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    losses = []
    for ids in batches:
        logits = model(input_ids=ids).logits
        v = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"step {len(losses)} loss {loss.item():.6f}")
    from peft import get_peft_model_state_dict

    final = {"base_model.model." + n.removeprefix("base_model.model."): t.detach().contiguous()
             for n, t in get_peft_model_state_dict(model).items()}
    return torch.tensor(losses, dtype=torch.float64), final, k


def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    base = load_file(os.path.join(OUT, "llama_tiny.safetensors"))
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=64, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
    )
    model = LlamaForCausalLM(cfg).float()
    weights = {k: v for k, v in base.items() if not k.startswith("grad.") and k not in ("ids", "logits", "loss")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 64, (3, 12), generator=g) for _ in range(STEPS)]
    r, alpha, lr = 4, 8.0, 1e-2
    losses, final, n = train(model, r, alpha, lr, batches)
    tensors = {"losses": losses, **{f"batch.{i}": b for i, b in enumerate(batches)}, **final}
    meta = {"r": str(r), "lora_alpha": str(alpha), "lr": str(lr), "steps": str(STEPS)}
    save_file(tensors, os.path.join(OUT, "lora_tiny.safetensors"), metadata=meta)
    print("lora_tiny:", n, "adapters")


def smollm2(path, text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    with open(text, encoding="utf-8") as fh:
        corpus = fh.read()[:200_000]
    ids = torch.tensor(tok(corpus).input_ids, dtype=torch.int64)
    batch, seq = 4, 64
    batches = []
    for s in range(STEPS):
        rows = [ids[(s * batch + b) * 997 % (len(ids) - seq):][:seq] for b in range(batch)]
        batches.append(torch.stack(rows))
    r, alpha, lr = 8, 16.0, 1e-3
    losses, final, n = train(model, r, alpha, lr, batches)
    keep = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.29.self_attn.v_proj.lora_A.weight",
    ]
    tensors = {"losses": losses, **{f"batch.{i}": b.contiguous() for i, b in enumerate(batches)},
               **{k: final[k] for k in keep}}
    meta = {"r": str(r), "lora_alpha": str(alpha), "lr": str(lr), "steps": str(STEPS)}
    save_file(tensors, os.path.join(OUT, "lora_smollm2.safetensors"), metadata=meta)
    print("lora_smollm2:", n, "adapters")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--text", help="training text for --smollm2 (the Shakespeare corpus)")
    a = ap.parse_args()
    if a.smollm2:
        smollm2(a.smollm2, a.text)
    else:
        tiny()
