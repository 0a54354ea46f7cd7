#!/usr/bin/env python3
"""Write the seed corpus of the fuzz targets (fuzz/seeds/<target>/): a few tiny valid files
per reader, so libFuzzer starts from inputs that get past the magic numbers and headers.

    pip install torch pillow      # only for the torch/pickle and image seeds
    python3 tools/fuzz_seeds.py   # then tools/fuzz.sh

Everything but the torch files and the JPEG is built byte by byte here. Inputs of the csv
and tokenizer targets start with one selector byte (see their fuzz_targets/*.rs).
"""
import collections
import gzip
import io
import json
import os
import pickle
import shutil
import struct
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "seeds")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def gz(data):
    # mtime=0 keeps the bytes the same from run to run.
    return gzip.compress(data, mtime=0)


# ---------------------------------------------------------------------------------- idx
def idx(dims, data):
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(data)


def idx_seeds():
    write("idx", "images.idx", idx([2, 3, 3], range(18)))
    write("idx", "labels.idx.gz", gz(idx([3], [7, 0, 9])))


# ---------------------------------------------------------------------------------- csv
def csv_seeds():
    # Selector bits: delimiter (0-1), header rule (2-3), label column (4-5), classes (6).
    write("csv", "header.csv", b"\x00" + b"x,y,label\n0.5,1,0\n2,-3e2,1\n\n4,5.25,2\n")
    write("csv", "semicolon.csv", bytes([1 | 2 << 2]) + b"1;2;3\n4;5;6\n")
    write("csv", "first_label.csv", bytes([2 << 4]) + b"3,0.1,0.2\n1,0.3,0.4\n")
    write("csv", "packed.csv.gz", b"\x00" + gz(b"a,b\n1,0\n2,1\n"))


# -------------------------------------------------------------------------- safetensors
def safetensors(tensors, metadata=None):
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    write("safetensors", "f32_i64.safetensors", safetensors({
        "w": ("F32", [2, 2], struct.pack("<4f", 1.5, -2, 0.25, 8)),
        "ids": ("I64", [2], struct.pack("<2q", 3, -4)),
    }, {"format": "pt"}))
    write("safetensors", "dtypes.safetensors", safetensors({
        "h": ("F16", [2], struct.pack("<2e", 1.0, -0.5)),
        "bf": ("BF16", [1, 1], b"\x80\x3f"),
        "m": ("BOOL", [3], b"\x01\x00\x01"),
        "u": ("U8", [2, 0], b""),
        "i": ("I32", [], struct.pack("<i", 7)),
    }))


# --------------------------------------------------------------------------------- gguf
def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(v):
    """(type id, bytes) of a metadata value: int -> u32, float -> f32, str, bool, list."""
    if isinstance(v, bool):
        return 7, bytes([v])
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, gguf_str(v)
    if isinstance(v, tuple) and v[0] == "i32":
        return 9, struct.pack("<IQ", 5, len(v[1])) + b"".join(struct.pack("<i", x) for x in v[1])
    items = [gguf_value(x) for x in v]
    return 9, struct.pack("<IQ", items[0][0], len(items)) + b"".join(b for _, b in items)


def gguf(metadata, tensors, alignment=32):
    """tensors: (name, ggml dims innermost first, ggml type id, raw bytes)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, v in metadata.items():
        t, b = gguf_value(v)
        out += gguf_str(k) + struct.pack("<I", t) + b
    data, offsets = b"", []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        offsets.append(len(data))
        data += raw
    for (name, ne, ty, _), off in zip(tensors, offsets):
        out += gguf_str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", ty, off)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def gguf_seeds():
    tokens = ["a", "b", "c", "ab", "\u0120", "<s>"]
    meta = {
        "general.architecture": "llama",
        "general.alignment": 32,
        "llama.block_count": 1,
        "llama.embedding_length": 4,
        "llama.feed_forward_length": 8,
        "llama.attention.head_count": 2,
        "llama.context_length": 16,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.token_type": ("i32", [1, 1, 1, 1, 1, 3]),
        "tokenizer.ggml.bos_token_id": 5,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
    }
    q8 = struct.pack("<e", 0.5) + bytes(range(32))
    write("gguf", "llama_tiny.gguf", gguf(meta, [
        ("token_embd.weight", [4, 6], 0, struct.pack("<24f", *[i / 8 for i in range(24)])),
        ("blk.0.attn_q.weight", [32, 1], 8, q8),
        ("output_norm.weight", [4], 1, struct.pack("<4e", 1, 1, 1, 1)),
    ]))
    blocks = [
        ("q4_0", [32], 2, 18), ("q4_1", [32], 3, 20), ("q5_0", [32], 6, 22), ("q5_1", [32], 7, 24),
        ("q2_k", [256], 10, 84), ("q4_k", [256], 12, 144), ("q6_k", [256], 14, 210),
    ]
    write("gguf", "quants.gguf", gguf({"general.name": "q"}, [
        (name, ne, ty, bytes((i * 7 + 1) % 256 for i in range(size))) for name, ne, ty, size in blocks
    ], alignment=64))


# ------------------------------------------------------------------------ pickle, torch
def torch_seeds():
    import torch

    sd = collections.OrderedDict(
        w=torch.arange(6.0).reshape(2, 3), b=torch.tensor([1, -2], dtype=torch.int64))
    sd._metadata = {"": {"version": 1}}
    for name, obj, zip_format in [
        ("state_dict_zip.pt", sd, True),
        ("state_dict_legacy.pt", sd, False),
        ("views_legacy.pt", {"t": torch.arange(4, dtype=torch.int16).reshape(2, 2).t(),
                             "p": torch.nn.Parameter(torch.ones(2, dtype=torch.float16)),
                             "step": 3, "cfg": ("adam", 1e-3, None, True)}, False),
    ]:
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
        write("torch", name, buf.getvalue())
        if zip_format:
            # The zip's pickle is a pickle seed too: storages, rebuild calls, OrderedDict.
            with __import__("zipfile").ZipFile(io.BytesIO(buf.getvalue())) as z:
                pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
                write("pickle", "torch_data.pkl", z.read(pkl))


def pickle_seeds():
    obj = {"a": 1, "b": [1.5, "x", b"by", None, True, -(2 ** 70)], "c": (1, 2, 3), "d": {4, 5}}
    for proto in (0, 2, 4, 5):
        write("pickle", f"mixed_p{proto}.pkl", pickle.dumps(obj, protocol=proto))
    shared = [1, 2]
    write("pickle", "shared.pkl", pickle.dumps([shared, shared, frozenset([3])], protocol=2))


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_seeds():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5, "##s": 6, ",": 7, "!": 8}
    wordpiece = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in list(vocab.items())[:4]],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab},
    }
    write("tokenizer", "wordpiece.json", b"\x00" + json.dumps(wordpiece).encode())
    bpe = {
        "version": "1.0", "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {"h": 0, "e": 1, "l": 2, "o": 3, "he": 4, "ll": 5, "\u0120": 6},
                  "merges": ["h e", "l l"]},
    }
    write("tokenizer", "bpe.json", b"\x00" + json.dumps(bpe).encode())
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
              "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}{% if messages|length > 5 %}{{ raise_exception('too long') }}{% endif %}")
    write("tokenizer", "chatml.jinja", bytes([1 | 4]) + chatml.encode())
    write("tokenizer", "vocab.txt", bytes([2 | 4 | 2 << 3]) + "H\ne\nl\no\nll\n\u0120\n\nl l\n".encode())
    write("tokenizer", "chars.txt", b"\x03" + "abc xyz,!\n".encode())


# --------------------------------------------------------------------------- config json
def config_seeds():
    configs = {
        "bert.json": {"vocab_size": 30, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 64,
                      "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
                      "position_embedding_type": "absolute", "architectures": ["BertModel"]},
        "adapter.json": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["query", "value"],
                         "bias": "none", "peft_type": "LORA", "task_type": "SEQ_CLS"},
        "gpt.json": {"vocab_size": 65, "context": 64, "layers": 2, "heads": 2, "width": 32, "dropout": 0.1},
        "unet.json": {"base_channels": 16, "channel_mult": [1, 2], "norm_groups": 4, "num_classes": None},
        "mamba.json": {"d_model": 32, "n_layers": 2, "dt_rank": None, "pad_vocab_size_multiple": 8},
        "llama.json": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "rope_theta": 10000.0, "tie_word_embeddings": False},
    }
    for name, c in configs.items():
        write("config_json", name, json.dumps(c))


# --------------------------------------------------------------------------------- image
def png(width, height, color_type, rows):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    raw = b"".join(b"\0" + bytes(r) for r in rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def image_seeds():
    write("image", "rgb.png", png(2, 2, 2, [[255, 0, 0, 0, 255, 0], [0, 0, 255, 9, 9, 9]]))
    write("image", "grey_alpha.png", png(3, 1, 4, [[0, 255, 128, 128, 255, 0]]))
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 60)).save(buf, format="JPEG", quality=50)
    write("image", "tiny.jpg", buf.getvalue())


if __name__ == "__main__":
    shutil.rmtree(ROOT, ignore_errors=True)
    idx_seeds()
    csv_seeds()
    safetensors_seeds()
    gguf_seeds()
    pickle_seeds()
    torch_seeds()
    tokenizer_seeds()
    config_seeds()
    image_seeds()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    print(f"wrote {ROOT}: {total} bytes")
