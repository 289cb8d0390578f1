"""End-to-end ResNet training and inference throughput: eager (torchvision, else the in-tree reference with the
same architecture), torch.compile of eager, fused, and torch.compile of fused, measured side by side in one run.

    python benchmarks/bench_resnet.py                       # CUDA: ResNet-50, batch 256, 224x224, bf16
    python benchmarks/bench_resnet.py --smoke               # any device: tiny sizes, checks the harness
    python benchmarks/bench_resnet.py --json out.json --variants eager,fused

Training step = forward + backward + SGD (momentum 0.9) on synthetic data, channels_last, autocast; inference
= eval mode under torch.inference_mode. Median over timed steps after warm-up (compilation included in the
warm-up), device-synchronised; peak memory from torch.cuda.max_memory_allocated over the timed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_resnet  # noqa: E402
from common import synchronize  # noqa: E402
from fused_resnet.models import torchvision_reference  # noqa: E402

VARIANTS = ("eager", "compile", "fused", "fused_compile")


def build_eager(arch: str, num_classes: int):
    try:
        import torchvision

        return getattr(torchvision.models, arch)(num_classes=num_classes), "torchvision"
    except Exception:  # noqa: BLE001 - torchvision missing or unusable with this torch
        return torchvision_reference.build(arch, num_classes=num_classes), "in-tree reference"


def build(variant: str, arch: str, num_classes: int, backend, device):
    if variant in ("eager", "compile"):
        model, source = build_eager(arch, num_classes)
    else:
        model, source = fused_resnet.models.BUILDERS[arch](num_classes=num_classes, backend=backend), "fused_resnet"
    model = model.to(device).to(memory_format=torch.channels_last)
    runner = torch.compile(model) if variant.endswith("compile") else model
    return model, runner, source


def _timed(fn, device, steps: int, warmup: int) -> tuple[float, float]:
    """(median seconds per call, peak bytes allocated during the timed calls)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def measure(variant: str, args, device) -> dict:
    torch.manual_seed(0)
    model, runner, source = build(variant, args.arch, args.num_classes, args.backend, device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, args.num_classes, (args.batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = dict(device_type=device.type, dtype=args.dtype, enabled=args.dtype != torch.float32)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            loss = nn.functional.cross_entropy(runner(x), target)
        loss.backward()
        opt.step()

    def infer():
        with torch.inference_mode(), torch.autocast(**autocast):
            runner(x)

    model.train()
    train_s, train_peak = _timed(train_step, device, args.steps, args.warmup)
    model.eval()
    infer_s, _ = _timed(infer, device, args.steps, args.warmup)
    del model, runner, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(variant=variant, model_source=source, train_ms=train_s * 1e3, train_img_s=args.batch / train_s,
                peak_gib=train_peak / 2**30, infer_ms=infer_s * 1e3, infer_img_s=args.batch / infer_s)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", choices=list(fused_resnet.models.BUILDERS))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--backend", default=None, help="fused backend (default: automatic)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks the harness")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: the end-to-end benchmark measures GPU training (use --smoke on CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    args.batch = args.batch or (4 if args.smoke else 256)
    args.size = args.size or (64 if args.smoke else 224)
    args.steps = args.steps or (2 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.smoke and not cuda and args.dtype == torch.float16:
        args.dtype = torch.bfloat16
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if cuda:
        torch.backends.cudnn.benchmark = True

    results = [measure(v, args, device) for v in variants]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"\n{args.arch}, batch {args.batch}, {args.size}x{args.size}, {str(args.dtype).split('.')[-1]} autocast, "
          f"channels_last | {name} | torch {torch.__version__} | fused backend "
          f"{fused_resnet.backends.resolve(args.backend, device)} | median of {args.steps} steps")
    base = {r["variant"]: r for r in results}
    print(f"| {'variant':<14} | {'train img/s':>11} | {'ms/step':>8} | {'peak GiB':>8} | {'infer img/s':>11} | "
          f"{'train vs eager':>14} | {'train vs compile':>16} | {'peak vs eager':>13} |")
    for r in results:
        def ratio(key, ref):
            return f"{r[key] / base[ref][key]:.2f}x" if ref in base else "-"
        print(f"| {r['variant']:<14} | {r['train_img_s']:>11.0f} | {r['train_ms']:>8.1f} | {r['peak_gib']:>8.2f} | "
              f"{r['infer_img_s']:>11.0f} | {ratio('train_img_s', 'eager'):>14} | "
              f"{ratio('train_img_s', 'compile'):>16} | {ratio('peak_gib', 'eager'):>13} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, arch=args.arch, batch=args.batch, size=args.size,
                           dtype=str(args.dtype), results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
