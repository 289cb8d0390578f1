"""Timing and shape tables shared by the benchmarks (and, later, the CLI)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

# Every BatchNorm of torchvision's ResNet-50 (v1.5: stride on the 3x3 conv), as (name, C, H=W, epilogue);
# epilogue: "relu" (bn1/bn2), "add_relu" (bn3 + identity), "none" (downsample BN). Repeated blocks share a row.
RESNET50_BN_SHAPES = [
    ("stem.bn1", 64, 112, "relu"),
    ("layer1.bn1/bn2", 64, 56, "relu"),
    ("layer1.bn3", 256, 56, "add_relu"),
    ("layer1.downsample", 256, 56, "none"),
    ("layer2.0.bn1", 128, 56, "relu"),
    ("layer2.bn1/bn2", 128, 28, "relu"),
    ("layer2.bn3", 512, 28, "add_relu"),
    ("layer2.downsample", 512, 28, "none"),
    ("layer3.0.bn1", 256, 28, "relu"),
    ("layer3.bn1/bn2", 256, 14, "relu"),
    ("layer3.bn3", 1024, 14, "add_relu"),
    ("layer3.downsample", 1024, 14, "none"),
    ("layer4.0.bn1", 512, 14, "relu"),
    ("layer4.bn1/bn2", 512, 7, "relu"),
    ("layer4.bn3", 2048, 7, "add_relu"),
    ("layer4.downsample", 2048, 7, "none"),
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(fn: Callable[[], object], device: torch.device, min_round_s: float = 2e-3, warmup: int = 3) -> int:
    """Warm ``fn`` up (compilation, autotuning, allocator) and return k, the number of back-to-back calls a
    timed round needs to last at least ``min_round_s`` (amortising launch gaps and the final sync)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    k = 1
    while k < 4096:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        synchronize(device)
        if time.perf_counter() - t0 >= min_round_s:
            break
        k *= 2
    return k


def time_per_call(fn: Callable[[], object], device: torch.device, rounds: int = 25) -> float:
    """Median seconds per call over ``rounds`` rounds of k calls each, device-synchronised."""
    k = calibrate(fn, device)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) / k)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written) of a large same-device copy."""
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda: dst.copy_(src), device, rounds=15)
    return 2 * n * src.element_size() / seconds
