"""ATen's CPU convolution (oneDNN) against the im2col + GEMM one (fused_resnet/conv_gemm.py), per convolution
of ResNet-18 at the CPU demo configuration (batch 8, 64x64, fp32, channels_last), forward and backward
(input + weight gradients), on one thread. The numbers behind conv_gemm's docstring and the cpu backend's
per-shape choice (README, "The CPU backend").

    OMP_NUM_THREADS=1 python benchmarks/cpu_conv_algorithms.py [--batch 8] [--size 64]
"""
from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tb

from fused_resnet import conv_gemm, reference
from fused_resnet.benchmarking.report import format_table

# (C, K, R, stride, input size as a fraction of the image) of ResNet-18's distinct convolutions after the stem
SHAPES = [(64, 64, 3, 1, 4), (64, 128, 3, 2, 4), (64, 128, 1, 2, 4), (128, 128, 3, 1, 8), (128, 256, 3, 2, 8),
          (128, 256, 1, 2, 8), (256, 256, 3, 1, 16), (256, 512, 3, 2, 16), (256, 512, 1, 2, 16),
          (512, 512, 3, 1, 32)]


def _ms(fn) -> tuple[float, float]:
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1).blocked_autorange(min_run_time=0.5)
    return m.median * 1e3, m.iqr / m.median * 100


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for c, k, r, s, frac in SHAPES:
        h = args.size // frac
        x = torch.randn(args.batch, c, h, h).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(k, c, r, r) / (c * r * r) ** 0.5).contiguous(memory_format=torch.channels_last)
        conv = ([s, s], [r // 2] * 2, [1, 1], 1)
        g = torch.randn_like(reference.conv_fwd(x, w, *conv)[0])
        row = [f"{c}->{k} {r}x{r}/{s} @ {h}x{h}", str(conv_gemm.applies(x, w, *conv))]
        for fwd, bwd in ((reference.conv_fwd, reference.conv_backward), (conv_gemm.conv_fwd, conv_gemm.conv_backward)):
            for fn in (lambda: fwd(x, w, *conv), lambda: bwd(g, x, w, *conv)):
                med, iqr = _ms(fn)
                row.append(f"{med:.2f} ({iqr:.0f}%)")
        rows.append(row)
    print(f"batch {args.batch}, {args.size}x{args.size} image, fp32, channels_last, 1 thread; ms median (IQR %)")
    print(format_table(["convolution", "gemm applies", "aten fwd", "aten bwd", "gemm fwd", "gemm bwd"], rows))


if __name__ == "__main__":
    main()
