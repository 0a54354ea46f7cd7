#!/usr/bin/env python3
"""Write the PyTorch checkpoint fixtures for nerve-io's `.pt` / `.pth` reader tests.

Every checkpoint is written twice, in torch.save's zip format (the default since 1.6) and in
its legacy format (`_use_new_zipfile_serialization=False`), and the values every tensor must
load as go to `expected.safetensors` (key `<fixture>/<name>`, with the name order of each
fixture in the metadata under `order/<fixture>`). Then hostile and damaged files: pickles
that call `os.system` / `builtins.exec` (hand-written bytes, never executed), a storage
shorter than its tensor claims, a view past its storage, absurd sizes, a truncated legacy
file, a whole pickled nn.Module. A few legitimate files torch no longer writes (a big-endian
zip, a legacy storage view) are built by hand and checked with torch.load(weights_only=True).

    pip install torch safetensors numpy
    python3 tools/torch_pt_fixtures.py   # writes crates/nerve-io/tests/fixtures/torch/

The zip files carry a random serialization id, so reruns change bytes but not values; the
Rust tests need no Python.
"""
import collections
import io
import os
import pickle
import pickletools
import struct
import sys
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "nerve-io", "tests", "fixtures", "torch")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)
warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
expected = {}
metadata = {}


def path(name):
    return os.path.join(OUT, name)


def flatten(obj, prefix=""):
    """(name, tensor) pairs the way nerve_io::torch::load names them."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, (str, int)) and not isinstance(k, bool):
                yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}.{i}" if prefix else str(i))


def record_expected(fixture, obj):
    names = []
    for name, t in flatten(obj):
        expected[f"{fixture}/{name}"] = t.detach().contiguous().clone()
        names.append(name)
    metadata[f"order/{fixture}"] = "\n".join(names)


def save_both(fixture, obj, **kw):
    """torch.save in both formats, check torch reads both back, record expected values."""
    torch.save(obj, path(f"{fixture}_zip.pt"), **kw)
    torch.save(obj, path(f"{fixture}_legacy.pt"), _use_new_zipfile_serialization=False, **kw)
    for fmt in ("zip", "legacy"):
        back = torch.load(path(f"{fixture}_{fmt}.pt"), weights_only=True)
        for (n1, a), (n2, b) in zip(flatten(obj), flatten(back)):
            assert n1 == n2 and a.dtype == b.dtype and torch.equal(a, b), (fixture, fmt, n1)
    record_expected(fixture, obj)


# ---------------------------------------------------------------- a tiny module's state_dict
module = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
module.train()
module(torch.randn(5, 4))  # running stats move, num_batches_tracked becomes 1
module(torch.randn(5, 4))
sd = module.state_dict()
assert sd["1.num_batches_tracked"].dtype == torch.int64 and sd["1.num_batches_tracked"].item() == 2
save_both("module", sd)

# ---------------------------------------------------------------- dtypes, views, shared storage
base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7 - 1
shared = torch.randn(10)
dtypes = {
    "f32": torch.randn(2, 3),
    "f64": torch.randn(3, dtype=torch.float64),
    "f16": torch.randn(2, 2).half(),
    "bf16": torch.randn(5).bfloat16(),
    "i64": torch.tensor([-(2**62), -1, 0, 7, 2**62 + 3], dtype=torch.int64),
    "i32": torch.tensor([[-(2**31), 5], [2**31 - 1, -7]], dtype=torch.int32),
    "i16": torch.tensor([-32768, 12, 32767], dtype=torch.int16),
    "i8": torch.tensor([-128, -1, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 1, 200, 255], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True, True, False]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
    # Views: saved as the whole storage with an offset and strides.
    "transposed": base.t(),
    "narrowed": base.narrow(1, 2, 3),
    "row": base[2],
    "permuted": torch.randn(2, 3, 4).permute(2, 0, 1),
    "strided": base[::2, ::3],
    "expanded": torch.tensor([1.0, 2.0, 3.0]).expand(2, 3),
    # Two tensors sharing one storage.
    "shared_a": shared[:6],
    "shared_b": shared[4:].view(2, 3),
}
assert not dtypes["transposed"].is_contiguous() and dtypes["narrowed"].storage_offset() == 2
assert dtypes["shared_a"].untyped_storage().data_ptr() == dtypes["shared_b"].untyped_storage().data_ptr()
save_both("dtypes", dtypes)

# ---------------------------------------------------------------- a nested training checkpoint
nested = {
    "model": sd,
    "epoch": 3,
    "name": "tiny",
    "lr": [0.1, 0.01],
    "history": [torch.tensor([1.0, 0.5]), torch.tensor([0.25])],
    "optimizer": {"state": {0: {"step": torch.tensor(4.0)}}},
}
save_both("nested", nested)

# ---------------------------------------------------------------- an nn.Parameter, saved alone
param = nn.Parameter(torch.randn(3, 2))
save_both("parameter", param)
torch.save(sd, path("module_zip_proto4.pt"), pickle_protocol=4)
record_expected("module_zip_proto4", sd)

# ---------------------------------------------------------------- hand-built files
MAGIC = 0x1950A86A20F9469CFC6C


class FakeStorage:
    def __init__(self, key, cls, numel, view=None):
        self.key, self.cls, self.numel, self.view = key, cls, numel, view


class FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class CraftPickler(pickle.Pickler):
    """Pickles FakeTensor/FakeStorage exactly as torch.save does, with whatever numbers."""

    legacy = False

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            pid = ("storage", getattr(torch, obj.cls), obj.key, "cpu", obj.numel)
            return pid + (obj.view,) if self.legacy else pid
        return None

    def reducer_override(self, obj):
        if isinstance(obj, FakeTensor):
            args = (obj.storage, obj.offset, tuple(obj.size), tuple(obj.stride), False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args)
        return NotImplemented


def craft_pickle(obj, legacy=False):
    f = io.BytesIO()
    p = CraftPickler(f, protocol=2)
    p.legacy = legacy
    p.dump(obj)
    return f.getvalue()


def write_zip(name, data_pkl, records, byteorder=b"little"):
    """A zip laid out like torch.save's: <archive>/data.pkl, data/<key>, byteorder, version."""
    arch = name.rsplit(".", 1)[0]
    with zipfile.ZipFile(path(name), "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{arch}/data.pkl", data_pkl)
        z.writestr(f"{arch}/byteorder", byteorder)
        for key, data in records.items():
            z.writestr(f"{arch}/data/{key}", data)
        z.writestr(f"{arch}/version", b"3\n")


def legacy_file(main_pickle, storages):
    """The legacy layout: magic, version, sys_info, main pickle, keys, then count + bytes."""
    f = io.BytesIO()
    pickle.dump(MAGIC, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
    f.write(main_pickle)
    pickle.dump([k for k, _, _ in storages], f, protocol=2)
    for _, numel, data in storages:
        f.write(struct.pack("<q", numel))
        f.write(data)
    return f.getvalue()


# A legacy storage view (files from torch < 1.6 share storages this way): two tensors on
# views of one 8-element root storage.
root = np.arange(8, dtype="<f4") * 0.5
v1 = FakeStorage("root", "FloatStorage", 8, view=("view1", 2, 4))
v2 = FakeStorage("root", "FloatStorage", 8, view=("view2", 5, 3))
obj = collections.OrderedDict(a=FakeTensor(v1, 1, [3], [1]), b=FakeTensor(v2, 0, [3], [1]))
with open(path("storage_view_legacy.pt"), "wb") as f:
    f.write(legacy_file(craft_pickle(obj, legacy=True), [("root", 8, root.tobytes())]))
back = torch.load(path("storage_view_legacy.pt"), weights_only=True)
assert back["a"].tolist() == [1.5, 2.0, 2.5] and back["b"].tolist() == [2.5, 3.0, 3.5], back
record_expected("storage_view_legacy", back)

# A big-endian zip (what torch.save writes on s390x): the dtypes fixture, each storage
# byte-swapped and byteorder = "big". torch.load byte-swaps it back.
src = zipfile.ZipFile(path("dtypes_zip.pt"))
arch = src.namelist()[0].split("/")[0]
storage_sizes = {}


class Census(pickle.Unpickler):
    def persistent_load(self, pid):
        storage_sizes[pid[2]] = torch.empty(0, dtype=pid[1].dtype).element_size()
        return None

    def find_class(self, module, name):
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if (module, name) in {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")}:
            return lambda *a: None
        raise pickle.UnpicklingError(f"{module}.{name}")


Census(io.BytesIO(src.read(f"{arch}/data.pkl"))).load()
with zipfile.ZipFile(path("dtypes_bigendian_zip.pt"), "w", zipfile.ZIP_STORED) as dst:
    for info in src.infolist():
        data = src.read(info.filename)
        rel = info.filename[len(arch) + 1:]
        if rel == "byteorder":
            data = b"big"
        elif rel.startswith("data/"):
            size = storage_sizes[rel[5:]]
            data = np.frombuffer(data, dtype=np.uint8).reshape(-1, size)[:, ::-1].tobytes()
        dst.writestr(info.filename.replace(arch, "dtypes_bigendian_zip", 1), data)
back = torch.load(path("dtypes_bigendian_zip.pt"), weights_only=True)
for k, v in dtypes.items():
    assert torch.equal(back[k], v), k

# ---- hostile and damaged files (the Rust tests expect errors naming the problem)
# {"weight": os.system("echo pwned")}, by hand: GLOBAL 'os system' + REDUCE.
EVIL = (b"\x80\x02}q\x00X\x06\x00\x00\x00weightq\x01cos\nsystem\nq\x02"
        b"X\n\x00\x00\x00echo pwnedq\x03\x85q\x04Rq\x05s.")
# Protocol 4: STACK_GLOBAL 'builtins' 'exec' + REDUCE, inside a list.
_body = (b"]\x94(\x8c\x08builtins\x94\x8c\x04exec\x94\x93\x94"
         b"\x8c\x0bprint('hi')\x94\x85\x94R\x94e.")
EVIL4 = b"\x80\x04\x95" + struct.pack("<Q", len(_body)) + _body
for bad in (EVIL, EVIL4):
    ops = [op.name for op, _, _ in pickletools.genops(bad)]  # parses, never executes
    assert "REDUCE" in ops and ops[-1] == "STOP", ops
write_zip("evil_os_system_zip.pt", EVIL, {})
with open(path("evil_os_system_legacy.pt"), "wb") as f:
    f.write(legacy_file(EVIL, []))
write_zip("evil_exec_proto4_zip.pt", EVIL4, {})

# A whole nn.Module pickled (needs its Python classes; refused, naming the first class).
torch.save(nn.Sequential(nn.Linear(2, 2)), path("whole_module_zip.pt"))

# A TorchScript archive (torch.jit.save): a zip with data.pkl too, but code, not a checkpoint.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; old files remain
    torch.jit.script(nn.Linear(2, 2)).save(path("torchscript_zip.pt"))

# A storage record shorter than declared: 6 floats declared, 3 in the record.
s = FakeStorage("0", "FloatStorage", 6)
write_zip("short_storage_zip.pt", craft_pickle({"w": FakeTensor(s, 0, [2, 3], [3, 1])}),
          {"0": np.ones(3, dtype="<f4").tobytes()})
# A view reaching past its storage: size 5 on a 4-element storage.
s = FakeStorage("0", "FloatStorage", 4)
write_zip("view_past_storage_zip.pt", craft_pickle({"w": FakeTensor(s, 0, [5], [1])}),
          {"0": np.ones(4, dtype="<f4").tobytes()})
# An absurd storage size (2**50 floats) on a tiny record: must fail before allocating.
s = FakeStorage("0", "FloatStorage", 2**50)
write_zip("huge_storage_zip.pt", craft_pickle({"w": FakeTensor(s, 0, [2**50], [1])}),
          {"0": np.ones(4, dtype="<f4").tobytes()})
# A stride-0 view of 2**40 elements over one float: must be refused, not allocated.
s = FakeStorage("0", "FloatStorage", 1)
write_zip("huge_expand_zip.pt", craft_pickle({"w": FakeTensor(s, 0, [2**20, 2**20], [0, 0])}),
          {"0": np.ones(1, dtype="<f4").tobytes()})
# A legacy file cut in the middle of its last storage.
with open(path("module_legacy.pt"), "rb") as f:
    whole = f.read()
with open(path("truncated_legacy.pt"), "wb") as f:
    f.write(whole[:-5])
# A legacy file whose element count disagrees with the pickle's declared storage size.
s = FakeStorage("k", "FloatStorage", 4)
with open(path("count_mismatch_legacy.pt"), "wb") as f:
    f.write(legacy_file(craft_pickle({"w": FakeTensor(s, 0, [4], [1])}, legacy=True),
                        [("k", 3, np.ones(3, dtype="<f4").tobytes())]))
for bad in ("short_storage_zip.pt", "view_past_storage_zip.pt", "truncated_legacy.pt",
            "count_mismatch_legacy.pt"):
    try:
        torch.load(path(bad), weights_only=True)
    except Exception:
        pass
    else:
        sys.exit(f"torch.load accepted {bad}")

save_file(expected, path("expected.safetensors"), metadata=metadata)
os.chmod(path("expected.safetensors"), 0o644)
total = sum(os.path.getsize(path(n)) for n in os.listdir(OUT))
print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, to {os.path.normpath(OUT)}")
