"""Image datasets for ``fused-resnet train``, loaded whole into memory as float tensors (N, 3, S, S).

  digits        scikit-learn's handwritten digits (1,797 8x8 greyscale scans of 10 digits, shipped inside the
                scikit-learn package: no download), upsampled to S x S and repeated on 3 channels.
  ImageFolder   DIR/<class name>/<image files>, torchvision's layout; decoded with Pillow, resized to S x S.

A folder is loaded whole, so before decoding anything its size is estimated (N x 3 x S x S float32, held
TRAINING_COPIES times over by training: the tensor, its train/test split and the normalised copy) and
refused, naming a --limit and a --size that fit, when that exceeds the memory available. --limit picks
its random subset before decoding, so it also makes a large folder fit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from . import common
from .common import CLIError

TRAINING_COPIES = 3
HEADROOM = 0.8  # of the available memory: the model, the optimizer and the allocator need the rest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Dataset:
    name: str
    images: torch.Tensor   # float32, (N, 3, S, S), in [0, 1]
    labels: torch.Tensor   # int64, (N,)
    classes: list[str]


def load_digits(size: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise CLIError("the default dataset (handwritten digits) ships with scikit-learn, which is not installed: "
                       "pip install scikit-learn, or pass --data DIR (an ImageFolder-style folder)") from None
    digits = sk_load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8), in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    return Dataset("digits (scikit-learn)", images.expand(-1, 3, -1, -1).contiguous(), labels,
                   [str(c) for c in digits.target_names])


def load(root: str | None, size: int, limit: int | None = None, seed: int = 0) -> Dataset:
    """The training set: ImageFolder ``root`` or the digits; with ``limit``, a random subset of that many
    images (drawn from ``seed``, in the folder's order before decoding)."""
    if root:
        return load_image_folder(root, size, limit, seed)
    dataset = load_digits(size)
    if limit:
        keep = _subset(len(dataset.labels), limit, seed)
        dataset.images, dataset.labels = dataset.images[keep], dataset.labels[keep]
    return dataset


def _subset(n: int, limit: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]


def check_fits(root: str, n: int, size: int) -> None:
    """A CLIError when ``n`` images at ``size`` x ``size`` would not fit in memory (see the module docstring)."""
    available = common.available_memory()
    if available is None:
        return
    per_image = 3 * size * size * 4  # float32
    need = TRAINING_COPIES * n * per_image
    budget = HEADROOM * available
    if need <= budget:
        return
    max_images = int(budget // (TRAINING_COPIES * per_image))
    max_size = int((budget / (TRAINING_COPIES * n * 3 * 4)) ** 0.5)
    hints = [f"--limit {max_images}" if max_images >= 2 else None, f"--size {max_size}" if max_size >= 16 else None]
    raise CLIError(f"--data {root!r}: {n:,} images at {size}x{size} are {common.gib(n * per_image)} as float32, "
                   f"and training holds {TRAINING_COPIES} copies ({common.gib(need)}), more than "
                   f"{HEADROOM:.0%} of the {common.gib(available)} of memory available; "
                   + (f"use {' or '.join(h for h in hints if h)}" if any(hints) else "it cannot fit here"))


def load_image_folder(root: str, size: int, limit: int | None = None, seed: int = 0) -> Dataset:
    if not os.path.exists(root):
        raise CLIError(f"--data {root!r}: no such folder")
    if not os.path.isdir(root):
        raise CLIError(f"--data {root!r} is not a folder (expected DIR/<class name>/<images>)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    files = {c: sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
             for c in classes}
    classes = [c for c in classes if files[c]]
    if len(classes) < 2:
        raise CLIError(f"--data {root!r}: expected at least 2 class folders containing images "
                       f"({', '.join(IMAGE_EXTENSIONS)}), found {len(classes)}")
    entries = [(os.path.join(root, c, f), label) for label, c in enumerate(classes) for f in files[c]]
    if limit:
        entries = [entries[i] for i in _subset(len(entries), limit, seed).tolist()]
    check_fits(root, len(entries), size)
    try:
        from PIL import Image
    except ImportError:
        raise CLIError("reading images needs Pillow: pip install pillow") from None
    images, labels = [], []
    for path, label in entries:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((size, size), Image.BILINEAR)
                data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the user's file
            raise CLIError(f"cannot read image {path!r}: {exc}") from None
        images.append(data.view(size, size, 3).permute(2, 0, 1).float() / 255.0)
        labels.append(label)
    return Dataset(f"ImageFolder {os.path.abspath(root)}", torch.stack(images), torch.tensor(labels), classes)


def split(data: Dataset, test_fraction: float, seed: int):
    """A stratified-enough random split: (train images, train labels, test images, test labels)."""
    n = len(data.labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < 2:
        raise CLIError(f"the dataset has {n} images: too few to keep {n_test} for testing and train on the rest")
    test, train = order[:n_test], order[n_test:]
    return data.images[train], data.labels[train], data.images[test], data.labels[test]
