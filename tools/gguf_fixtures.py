#!/usr/bin/env python3
"""Fixtures for nerve-io's GGUF reader, written with llama.cpp's own Python package (gguf-py).

Rerun (from the repository root; the outputs are committed, the Rust tests need no Python):

    pip install gguf numpy safetensors
    python3 tools/gguf_fixtures.py

It writes, under crates/nerve-io/tests/fixtures/:

  gguf_types.gguf                  GGUF v3, default alignment (32): metadata of every value
                                   type (arrays, nested arrays included) and a few tensors of
                                   every type the reader dequantises: F32 (0-d to 4-d), F16
                                   (with inf/nan/subnormals), BF16, Q4_0, Q4_1, Q5_0, Q5_1,
                                   Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K.
  gguf_align64.gguf                a small file with general.alignment = 64.
  gguf_types_reference.safetensors gguf-py's dequantised f32 for every tensor of both files
                                   (row-major shapes; keys of the second file start with
                                   "align64/").

F32 and F16 tensors are numpy arrays written as they are; BF16 and Q4_0..Q8_0 are quantised
from random data by gguf.quants.quantize and dequantised back by gguf.quants.dequantize. gguf-py
cannot quantise the K-quants, so those tensors are random block bytes with sane f16 scales,
dequantised by gguf.quants.dequantize; gguf-py has no Q8_K at all, so its reference is
computed here (x = d * q, d an f32). The data are random but seeded: reruns give the same files.

A check against a real model, run by hand (nothing is committed):

    python3 tools/gguf_fixtures.py --real SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2_ref.safetensors
    NERVE_SMOLLM2_GGUF=SmolLM2-135M-Instruct.Q4_1.gguf NERVE_SMOLLM2_REF=/tmp/smollm2_ref.safetensors \
        cargo test -p nerve-io --test gguf_smollm2 -- --nocapture

writes gguf-py's dequantisation of a few of the model's tensors, which the Rust test compares
with nerve's reader and reports the largest difference.
"""

import argparse
import os
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "nerve-io", "tests", "fixtures")


def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def random_k_blocks(rng, qtype, n_blocks):
    """Random blocks of a K-quant, with f16 (Q8_K: f32) scales of a sane size and sign."""
    def scale(lo, hi):
        s = rng.uniform(lo, hi, size=n_blocks) * rng.choice([-1.0, 1.0], size=n_blocks)
        return f16_bytes(s)

    def raw(n):
        return rng.integers(0, 256, size=(n_blocks, n), dtype=np.uint8)

    if qtype == T.Q2_K:  # scales[16], qs[64], d, dmin
        parts = [raw(16), raw(64), scale(1e-3, 0.1), scale(1e-3, 0.1)]
    elif qtype == T.Q3_K:  # hmask[32], qs[64], scales[12], d
        parts = [raw(32), raw(64), raw(12), scale(1e-3, 0.1)]
    elif qtype == T.Q4_K:  # d, dmin, scales[12], qs[128]
        parts = [scale(1e-3, 0.1), scale(1e-3, 0.1), raw(12), raw(128)]
    elif qtype == T.Q5_K:  # d, dmin, scales[12], qh[32], qs[128]
        parts = [scale(1e-3, 0.1), scale(1e-3, 0.1), raw(12), raw(32), raw(128)]
    elif qtype == T.Q6_K:  # ql[128], qh[64], scales[16] (i8), d
        parts = [raw(128), raw(64), raw(16), scale(1e-3, 0.1)]
    elif qtype == T.Q8_K:  # d (f32), qs[256] (i8), bsums[16] (i16)
        d = (rng.uniform(1e-3, 0.1, size=n_blocks) * rng.choice([-1.0, 1.0], size=n_blocks))
        qs = rng.integers(-128, 128, size=(n_blocks, 256), dtype=np.int8)
        bsums = qs.astype(np.int16).reshape(n_blocks, 16, 16).sum(axis=-1).astype(np.int16)
        parts = [
            d.astype(np.float32).view(np.uint8).reshape(n_blocks, 4),
            qs.view(np.uint8),
            bsums.view(np.uint8).reshape(n_blocks, 32),
        ]
    else:
        raise ValueError(qtype)
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1], qtype
    return blocks


def dequantize_q8_k(blocks):
    d = blocks[:, :4].copy().view(np.float32)
    qs = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    return d * qs


def add_metadata(w):
    # Scalars of every type. The Rust test (tests/gguf.rs) asserts these exact values.
    w.add_key_value("test.u8", 200, V.UINT8)
    w.add_key_value("test.i8", -100, V.INT8)
    w.add_key_value("test.u16", 60000, V.UINT16)
    w.add_key_value("test.i16", -30000, V.INT16)
    w.add_key_value("test.u32", 4_000_000_000, V.UINT32)
    w.add_key_value("test.i32", -2_000_000_000, V.INT32)
    w.add_key_value("test.f32", 0.15625, V.FLOAT32)
    w.add_key_value("test.bool_true", True, V.BOOL)
    w.add_key_value("test.bool_false", False, V.BOOL)
    w.add_key_value("test.string", "h\u00e9llo, \u2713 w\u00f6rld", V.STRING)
    w.add_key_value("test.u64", 2**63 + 5, V.UINT64)
    w.add_key_value("test.i64", -(2**62) - 7, V.INT64)
    w.add_key_value("test.f64", 1.0 / 3.0, V.FLOAT64)
    # Arrays of every element type, and nested arrays.
    w.add_key_value("test.arr.u8", [0, 1, 255], V.ARRAY, V.UINT8)
    w.add_key_value("test.arr.i8", [-128, 0, 127], V.ARRAY, V.INT8)
    w.add_key_value("test.arr.u16", [0, 65535], V.ARRAY, V.UINT16)
    w.add_key_value("test.arr.i16", [-32768, 32767], V.ARRAY, V.INT16)
    w.add_key_value("test.arr.u32", [1, 2, 4_294_967_295], V.ARRAY, V.UINT32)
    w.add_key_value("test.arr.i32", [-1, 0, 2_147_483_647], V.ARRAY, V.INT32)
    w.add_key_value("test.arr.f32", [0.5, -2.25, 1e-3], V.ARRAY, V.FLOAT32)
    w.add_key_value("test.arr.bool", [True, False, True], V.ARRAY, V.BOOL)
    w.add_key_value("test.arr.string", ["a", "", "\u00fc\u00df"], V.ARRAY, V.STRING)
    w.add_key_value("test.arr.u64", [2**64 - 1, 0], V.ARRAY, V.UINT64)
    w.add_key_value("test.arr.i64", [-(2**63), 2**63 - 1], V.ARRAY, V.INT64)
    w.add_key_value("test.arr.f64", [0.1, -1e300], V.ARRAY, V.FLOAT64)
    # Inner element types are inferred by gguf-py: ints -> i32, strings -> string.
    w.add_key_value("test.arr.nested_i32", [[1, 2], [3]], V.ARRAY)
    w.add_key_value("test.arr.nested_str", [["x"], ["y", "z"]], V.ARRAY)
    w.add_key_value("test.arr.nested3", [[[7]]], V.ARRAY)
    # The keys a tokenizer reads.
    w.add_token_list(["<unk>", "h\u00e9", "\u0120the"])
    w.add_token_scores([0.0, -1.5, -2.0])
    w.add_token_types([2, 1, 1])


def build_types(rng, refs):
    w = gguf.GGUFWriter(os.path.join(OUT, "gguf_types.gguf"), arch="nerve-test")
    add_metadata(w)

    def plain(name, data):
        w.add_tensor(name, data)
        refs[name] = data.astype(np.float32)

    def quantised(name, data, qtype):
        q = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        refs[name] = gguf.quants.dequantize(q, qtype).astype(np.float32).reshape(data.shape)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # F32 of every rank, including 0-d.
    plain("f32.scalar", np.array(3.5, dtype=np.float32))
    plain("f32.vec", normal(7))
    plain("f32.mat", normal(3, 5))
    plain("f32.3d", normal(2, 3, 4))
    plain("f32.4d", normal(2, 1, 3, 2))
    # F16: random values, then the edge cases of the format.
    plain("f16.mat", normal(4, 6).astype(np.float16))
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, -65504.0, 6e-8, -6e-8, 6.1e-5,
         1.0, -1.0, 0.333, 1e-7, 2.0**-24, 2.0**-14],
        dtype=np.float16,
    ).reshape(2, 8)
    plain("f16.special", special)
    # BF16 (quantised from f32 by gguf-py's round-to-nearest-even).
    quantised("bf16.mat", normal(3, 8, scale=100.0), T.BF16)
    # The 32-element block types: one 2-d and one 3-d tensor each; the first block of the 2-d
    # one is all zeros (scale 0), the 3-d one has a large dynamic range.
    for qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        name = qtype.name.lower()
        a = normal(4, 64)
        a[0, :32] = 0.0
        quantised(f"{name}.mat", a, qtype)
        b = normal(2, 3, 32) * np.float32(10.0) ** rng.integers(-3, 3, size=(2, 3, 1))
        quantised(f"{name}.3d", b.astype(np.float32), qtype)
    # K-quants: random blocks, gguf-py's dequantisation as the reference.
    for qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K):
        name = qtype.name.lower()
        for suffix, shape in (("mat", (2, 256)), ("3d", (3, 1, 512))):
            n_blocks = int(np.prod(shape)) // 256
            blocks = random_k_blocks(rng, qtype, n_blocks)
            row_bytes = shape[-1] // 256 * blocks.shape[1]
            raw = blocks.reshape(*shape[:-1], row_bytes)
            w.add_tensor(f"{name}.{suffix}", raw, raw_shape=raw.shape, raw_dtype=qtype)
            if qtype == T.Q8_K:
                ref = dequantize_q8_k(blocks)
            else:
                ref = gguf.quants.dequantize(blocks, qtype)
            refs[f"{name}.{suffix}"] = ref.astype(np.float32).reshape(shape)
    write(w)


def build_align64(rng, refs):
    w = gguf.GGUFWriter(os.path.join(OUT, "gguf_align64.gguf"), arch="nerve-test")
    w.add_custom_alignment(64)
    a = rng.standard_normal((3, 3)).astype(np.float32)  # 36 bytes: the next tensor is padded
    w.add_tensor("first", a)
    refs["align64/first"] = a
    b = rng.standard_normal((2, 64)).astype(np.float32)
    q = gguf.quants.quantize(b, T.Q8_0)
    w.add_tensor("second", q, raw_shape=q.shape, raw_dtype=T.Q8_0)
    refs["align64/second"] = gguf.quants.dequantize(q, T.Q8_0).reshape(b.shape)
    write(w)


def write(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_with_reader(path, refs, prefix=""):
    """Read the file back with gguf-py's reader: every tensor must match its reference."""
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type != T.Q8_K else None
        ref = refs[prefix + t.name]
        if got is not None:
            np.testing.assert_array_equal(np.asarray(got, dtype=np.float32).reshape(ref.shape), ref)


def real(model, out):
    """gguf-py's dequantisation of a few tensors of a real model, for the Rust test to compare."""
    reader = gguf.GGUFReader(model)
    wanted = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight",
              "blk.29.ffn_gate.weight", "output_norm.weight", "blk.0.attn_norm.weight"}
    refs = {}
    for t in reader.tensors:
        if t.name in wanted:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            refs[t.name] = np.array(
                gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), dtype=np.float32, order="C")
            print(f"{t.name}: {t.tensor_type.name} {shape}")
    save_file(refs, out)
    print(f"wrote {len(refs)} tensors to {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", nargs=2, metavar=("MODEL_GGUF", "OUT_SAFETENSORS"),
                        help="write gguf-py's dequantisation of a few tensors of a real model")
    args = parser.parse_args()
    if args.real:
        real(*args.real)
        return
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20250131)
    refs = {}
    build_types(rng, refs)
    build_align64(rng, refs)
    check_with_reader(os.path.join(OUT, "gguf_types.gguf"), refs)
    check_with_reader(os.path.join(OUT, "gguf_align64.gguf"), refs, prefix="align64/")
    # np.array, not np.ascontiguousarray: the latter turns the 0-d tensor into a 1-d one.
    save_file({k: np.array(v, dtype=np.float32, order="C") for k, v in refs.items()},
              os.path.join(OUT, "gguf_types_reference.safetensors"))
    for name in ("gguf_types.gguf", "gguf_align64.gguf", "gguf_types_reference.safetensors"):
        print(f"{name}: {os.path.getsize(os.path.join(OUT, name))} bytes")


if __name__ == "__main__":
    sys.exit(main())
