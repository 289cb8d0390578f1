"""Microbenchmarks of the convolutions at every distinct convolution shape of ResNet-50 (batch 256, 224 x 224,
bf16, channels_last), forward and backward, for four providers:

  cudnn      ATen's convolution alone (cuDNN on CUDA): forward; backward = dgrad + wgrad
  cudnn+bn   what the fused models ran before the fused convolutions, and still run where the per-shape choice
             says so: the previous BatchNorm's apply + ReLU (Triton BatchNorm kernel, for the convolutions that
             follow a BatchNorm + ReLU), cuDNN, and the statistics pass over the output; backward = the same
             recompute of the prologue, dgrad and wgrad
  fused      the Triton convolutions with the prologue and the statistics epilogue; backward = dgrad and wgrad
             with the prologue recomputed in registers
  cutlass    the CUDA C++ convolutions (conv implementation "cuda": CUTLASS, csrc/cuda/conv/) with the prologue
             in the mainloop and the statistics in the epilogue, wgrad with the prologue recomputed,
             dgrad; where CUTLASS does not take a call (the stem's 3 channels, dilation) that call runs the
             ATen path, and the row says so ("ran": cutlass / aten per
             pass, "*" in the table), so a fallback is never reported as CUTLASS's speed

The BatchNorm backward of the prologue (mask, reductions, dx) is the same for cudnn+bn and fused and is left
out. FLOPs: 2 N Ho Wo K C_g R S forward, twice that backward; reported as TFLOP/s against the bf16 matmul rate
measured in the same run. Timing: timing.kernel_time, i.e. triton.testing.do_bench on CUDA (CUDA events, L2
flushed before each call), torch.utils.benchmark on CPU (the smoke run only); each record carries the samples
and their summary (median, quartiles, min).

    python benchmarks/bench_conv.py [--batch 256] [--out DIR] [--shapes layer1,stem] [--smoke]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import dispatch
from .report import dtype_name, format_table, triton_interpreted
from .timing import kernel_time

PROVIDERS = ("cudnn", "cudnn+bn", "fused", "cutlass")
IMPLS = {"cudnn+bn": "aten", "fused": "triton", "cutlass": "cuda"}  # provider -> dispatch conv implementation
PASSES = ("fwd", "bwd")


@dataclass
class ConvShape:
    name: str            # e.g. "layer1.0.conv2"
    x_shape: tuple
    weight_shape: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    prologue: bool       # follows a BatchNorm + ReLU in the fused model (bn1 -> conv2, bn2 -> conv3)

    @property
    def out_hw(self) -> tuple:
        from .._layout import conv_output_size

        return conv_output_size(self.x_shape[2], self.x_shape[3], self.weight_shape[2], self.weight_shape[3],
                                self.stride, self.padding, self.dilation)

    def flops(self) -> int:
        ho, wo = self.out_hw
        k, c_g, r, s = self.weight_shape
        return 2 * self.x_shape[0] * ho * wo * k * c_g * r * s

    def label(self) -> str:
        k, c_g, r, s = self.weight_shape
        return (f"{self.name} {self.x_shape[1]}->{k} {r}x{s}/{self.stride[0]} @{self.x_shape[2]}"
                + (" +bn" if self.prologue else ""))


def resnet50_conv_shapes(batch: int = 256, size: int = 224) -> list[ConvShape]:
    """Every distinct convolution of ResNet-50 (first occurrence's name), with whether it has a BN prologue."""
    from ..models import torchvision_reference as ref

    with torch.device("meta"):
        model = ref.build("resnet50").eval()  # eval: shapes only (a training BN refuses one value per channel)
    names = {m: n for n, m in model.named_modules()}
    seen, out = set(), []

    def hook(m, args, _):
        shape = ConvShape(names[m], tuple(args[0].shape), tuple(m.weight.shape), m.stride, m.padding, m.dilation,
                          m.groups, names[m].endswith(("conv2", "conv3")))
        k = (shape.x_shape, shape.weight_shape, shape.stride, shape.prologue)
        if k not in seen:
            seen.add(k)
            out.append(shape)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model(torch.empty(batch, 3, size, size, device="meta"))
    for h in handles:
        h.remove()
    return out


def _case_fns(shape: ConvShape, provider: str, device: torch.device, dtype: torch.dtype):
    """(forward, backward, what ran: {"fwd": impl, "bwd": impl}) of one provider on one shape; forward and
    backward are zero-argument callables."""
    cl = dict(memory_format=torch.channels_last)
    x = torch.randn(shape.x_shape, device=device, dtype=torch.float32).to(dtype).contiguous(**cl)
    w = (torch.randn(shape.weight_shape, device=device, dtype=torch.float32) * 0.05).to(dtype).contiguous(**cl)
    c = shape.x_shape[1]
    prologue = None
    if shape.prologue:
        prologue = (torch.randn(c, device=device), torch.rand(c, device=device) + 0.5,
                    torch.rand(c, device=device) + 0.5, torch.randn(c, device=device), True)
    args = (list(shape.stride), list(shape.padding), list(shape.dilation), shape.groups)
    ho, wo = shape.out_hw
    dy = torch.randn(shape.x_shape[0], shape.weight_shape[0], ho, wo, device=device).to(dtype).contiguous(**cl)
    if provider == "cudnn":
        def fwd():
            return torch.ops.aten.convolution(x, w, None, *args[:3], False, [0, 0], args[3])

        def bwd():
            return torch.ops.aten.convolution_backward(dy, x, w, None, *args[:3], False, [0, 0], args[3],
                                                       [True, True, False])
        return fwd, bwd, dict(fwd="cudnn", bwd="cudnn")
    backend = "triton" if device.type == "cuda" else "cpu"
    fns = dispatch.conv_functions(IMPLS[provider], backend)
    ran = dict(fwd=IMPLS[provider], bwd=IMPLS[provider])
    if provider == "cutlass":
        from ..ops import conv_compiled

        takes_fwd = conv_compiled.cutlass_takes(x, w, shape.groups, prologue, None, None, False, *args[:3])
        takes_dgrad = conv_compiled.cutlass_takes_dgrad(dy, w, x.shape, shape.dilation, shape.groups)
        ran = dict(fwd="cutlass" if takes_fwd else "aten",
                   bwd="cutlass" if takes_fwd and takes_dgrad else
                   ("cutlass wgrad + aten dgrad" if takes_fwd else
                    "aten wgrad + cutlass dgrad" if takes_dgrad else "aten"))

    def fwd():
        return fns.fwd(x, w, *args, prologue=prologue, stats=True)

    def bwd():
        fns.dgrad(dy, w, x.shape, *args, dtype, torch.channels_last)
        return fns.wgrad(dy, x, w.shape, *args, dtype, prologue)
    return fwd, bwd, ran


def skip_reason(provider: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r}"
    if provider == "fused":
        probe = torch.empty(1, 16, 1, 1, device=device, dtype=dtype)
        if not dispatch.supports_conv("triton", probe, torch.empty(16, 16, 1, 1, device=device, dtype=dtype)):
            return "the Triton convolutions need CUDA (or TRITON_INTERPRET=1) and bf16, fp16 or fp32"
    if provider == "cutlass":
        from ..ops import conv_compiled

        if device.type != "cuda":
            return "the CUTLASS convolutions need CUDA"
        if not conv_compiled.cutlass_built():
            return "fused_resnet._C was built without the CUTLASS convolutions (FUSED_RESNET_CUTLASS)"
        if dtype not in conv_compiled.CUTLASS_DTYPES:
            return f"the CUTLASS convolutions take {[dtype_name(d) for d in conv_compiled.CUTLASS_DTYPES]}"
    return None


def run(device: torch.device, dtype: torch.dtype, batch: int, size: int, providers: list[str],
        name_filter: Optional[list[str]] = None, matmul_flops: Optional[float] = None, log=print,
        rounds: int = 8) -> dict:
    """Every case, timed by kernel_time (``rounds`` 8: 40 ms of repetitions per case on CUDA, the budget the
    GPU session's conv step is sized for)."""
    shapes = [s for s in resnet50_conv_shapes(batch, size)
              if not name_filter or any(f in s.name for f in name_filter)]
    rows, skipped = [], {}
    for p in providers:
        reason = skip_reason(p, device, dtype)
        if reason:
            skipped[p] = reason
    for shape in shapes:
        for p in providers:
            if p in skipped:
                continue
            fwd, bwd, ran = _case_fns(shape, p, device, dtype)
            for direction, fn in (("fwd", fwd), ("bwd", bwd)):
                t = kernel_time(fn, device, rounds=rounds)
                flops = shape.flops() * (2 if direction == "bwd" else 1)
                row = dict(shape=shape.label(), name=shape.name, provider=p, direction=direction, ran=ran[direction],
                           interpreted=p == "fused" and triton_interpreted(), time_us=t.scaled(1e6).to_dict(),
                           flop=flops, tflop_per_s=flops / t.median / 1e12,
                           of_matmul_pct=(100 * flops / t.median / matmul_flops) if matmul_flops else None)
                rows.append(row)
                log(f"{row['shape']:<44} {p:<9} {direction} {row['time_us']['median']:9.1f} us "
                    f"(IQR {row['time_us']['iqr_pct']:.0f}%) {row['tflop_per_s']:7.1f} TFLOP/s  ran: {row['ran']}")
    return dict(results=rows, skipped=skipped, winners=winners(rows))


def winners(rows: list[dict]) -> dict:
    """Per shape, the provider with the smallest forward + backward median time among cudnn+bn, fused and
    cutlass (what the per-shape choice decides between); cudnn alone is the lower bound of the unfused path.
    A cutlass entry whose calls fell back to ATen (see "ran") competes as what actually ran."""
    total: dict = {}
    for r in rows:
        if r["provider"] != "cudnn":
            total.setdefault(r["shape"], {}).setdefault(r["provider"], 0.0)
            total[r["shape"]][r["provider"]] += r["time_us"]["median"]
    return {shape: min(t, key=t.get) for shape, t in total.items() if t}


def table(result: dict) -> str:
    rows = result["results"]
    index = {(r["shape"], r["provider"], r["direction"]): r for r in rows}
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    header = (["shape"] + [f"{p} {d} us (IQR) / TFLOP/s" for p in providers for d in PASSES]
              + ["speed-up of fused over cudnn+bn (fwd + bwd)", "winner"])
    lines = []
    for s in shapes:
        cells = [s]
        for p in providers:
            for d in PASSES:
                r = index.get((s, p, d))
                fallback = "*" if r and p == "cutlass" and r["ran"] != "cutlass" else ""
                cells.append(f"{r['time_us']['median']:.0f} ({r['time_us']['iqr_pct']:.0f}%) / "
                             f"{r['tflop_per_s']:.1f}{fallback}" if r else "-")
        f_, b_ = ([index.get((s, p, d)) for d in PASSES] for p in ("fused", "cudnn+bn"))
        if all(f_) and all(b_):
            cells.append(f"{sum(r['time_us']['median'] for r in b_) / sum(r['time_us']['median'] for r in f_):.2f}x")
        else:
            cells.append("-")
        cells.append(result["winners"].get(s, "-"))
        lines.append(cells)
    return format_table(header, lines)


def main(argv=None) -> int:
    import argparse
    import os
    import sys

    from .report import INTERPRETER_BANNER, result_document, write_json
    from .timing import matmul_rate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--shapes", default=None, help="comma-separated substrings of the layer names")
    parser.add_argument("--out", default="fused_resnet_results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (checks the harness; measures nothing)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = args.batch or (256 if cuda else 1)
    size = args.size or (224 if cuda else 32)
    mm = matmul_rate(device) if cuda else None
    result = run(device, dtype, batch, size, [p.strip() for p in args.providers.split(",") if p.strip()],
                 [s.strip() for s in args.shapes.split(",")] if args.shapes else None, mm.rate if mm else None)
    config = dict(batch=batch, size=size, dtype=dtype_name(dtype), smoke=args.smoke, providers=args.providers,
                  shapes=args.shapes)
    doc = result_document("bench_conv", sys.argv[1:] if argv is None else argv, device, config, result["results"],
                          skipped=result["skipped"], winners=result["winners"],
                          roof=dict(matmul=mm.to_dict() if mm else None),
                          choices=[str(c) for c in dispatch.conv_choices().items()])
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "bench_conv.json"), doc)
    if doc["interpreted"]:
        print(INTERPRETER_BANNER)
    print(table(result))
    if any(r["provider"] == "cutlass" and r["ran"] != "cutlass" for r in result["results"]):
        print("* cutlass: at least part of this pass ran the ATen path (CUTLASS does not take the call; see "
              "\"ran\" in bench_conv.json)")
    if result["skipped"]:
        print("skipped: " + "; ".join(f"{p}: {r}" for p, r in result["skipped"].items()))
    if doc["interpreted"]:
        print(INTERPRETER_BANNER)
    return 0

