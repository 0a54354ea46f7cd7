"""Reference results of transformers' Llama for nerve's parity tests.

    pip install torch transformers safetensors gguf
    python3 tools/torch_llama_fixtures.py                     # tiny random model (committed)
    python3 tools/torch_llama_fixtures.py --smollm2 FILE.gguf  # the real SmolLM2 (committed)

Writes crates/nerve-models/tests/fixtures/:
- llama_tiny.safetensors: a tiny random `LlamaForCausalLM` (grouped-query attention, tied
  embedding) with its weights under transformers' names, input ids, logits, the mean
  next-token loss and the gradient of every weight.
- smollm2_logits.safetensors (with --smollm2): transformers' logits of the last position of
  "The capital of France is" for SmolLM2-135M-Instruct read from the GGUF file (transformers
  dequantises it with gguf-py), the prompt's token ids, and the greedy continuation's ids;
  smollm2_tokenizer.json: transformers' token ids of a few texts and its chat template's
  rendering of a one-message chat.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "nerve-models", "tests", "fixtures")

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY, attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(cfg).float().eval()
    # Larger random norm weights than the default ones, so the norms are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    ids = torch.tensor([[1, 5, 9, 33, 2, 63, 7, 12, 40, 8], [3, 3, 17, 25, 60, 0, 11, 9, 4, 50]])
    out = model(ids)
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, TINY["vocab_size"]), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensors[name] = p.detach().contiguous()
    for name, p in model.named_parameters():
        tensors["grad." + name] = p.grad.detach().contiguous()
    tensors["ids"] = ids
    tensors["logits"] = logits.detach().contiguous()
    tensors["loss"] = loss.detach().reshape(1)
    save_file(tensors, os.path.join(OUT, "llama_tiny.safetensors"))
    print("llama_tiny: loss", loss.item())


def smollm2(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        gen = model.generate(ids, max_new_tokens=16, do_sample=False)
    print("ids", ids.tolist(), "continuation", repr(tok.decode(gen[0, ids.shape[1]:])))
    texts = [
        "The capital of France is",
        "Hello world! It's 2026-12-02, and 12345 apples cost $3.50.",
        "  leading spaces\n\nnew lines\ttabs   trailing  ",
        "ROMEO:\nBut, soft! what light through yonder window breaks?",
        "Unicode: café, naïve, 東京, Привет, emoji 🎉 and math ∑x²",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        "def f(x):\n    return x ** 2  # square",
    ]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    cases = {
        "encode": [{"text": t, "ids": tok(t).input_ids} for t in texts],
        "chat": {"messages": chat, "rendered": rendered},
    }
    with open(os.path.join(OUT, "smollm2_tokenizer.json"), "w") as fh:
        json.dump(cases, fh, ensure_ascii=False, indent=1)
    save_file(
        {"ids": ids[0].contiguous(), "last_logits": logits.contiguous(), "greedy": gen[0, ids.shape[1]:].contiguous()},
        os.path.join(OUT, "smollm2_logits.safetensors"),
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", help="SmolLM2-135M-Instruct.Q4_1.gguf")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if a.smollm2:
        smollm2(a.smollm2)
    else:
        tiny()
