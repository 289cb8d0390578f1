"""The main job: a small residual network built from fused modules, checked against its eager twin, then
timed and measured (activation memory saved for backward) on whatever device this machine has.

    python -m fused_resnet [--device cpu|cuda] [--backend B] [--batch N] [--size S] [--steps K]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from . import backends
from .nn import BatchNormAct2d


class _Block(nn.Module):
    """conv-bn-relu-conv-bn(+identity)-relu, torchvision's BasicBlock; ``fused`` swaps in BatchNormAct2d."""

    def __init__(self, cin: int, cout: int, stride: int, fused: bool, backend: str | None):
        super().__init__()
        self.fused = fused
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if fused:
            self.bn1 = BatchNormAct2d(cout, fuse_relu=True, backend=backend)
            self.bn2 = BatchNormAct2d(cout, fuse_relu=True, backend=backend)
        else:
            self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            bn = BatchNormAct2d(cout, backend=backend) if fused else nn.BatchNorm2d(cout)
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        if self.fused:
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=identity)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class SmallResNet(nn.Module):
    def __init__(self, fused: bool, backend: str | None = None, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = BatchNormAct2d(width, fuse_relu=True, backend=backend) if fused else nn.BatchNorm2d(width)
        self.fused = fused
        self.layers = nn.Sequential(_Block(width, width, 1, fused, backend), _Block(width, width, 1, fused, backend),
                                    _Block(width, 2 * width, 2, fused, backend))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.bn1(self.conv1(x)) if self.fused else torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _train_step(model, x, target):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    return loss


def _saved_bytes(model, x, target) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), target)
    del loss
    return sum(storages.values())


def _time_steps(model, x, target, steps: int, device: torch.device) -> float:
    """Median milliseconds per training step (forward + backward), after warm-up, device-synchronised."""
    for _ in range(3):
        _train_step(model, x, target)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _train_step(model, x, target)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _check_parity(eager, fused, x, target, dtype) -> list[str]:
    """One training step on both; returns the failures (empty: parity holds)."""
    torch.manual_seed(0)
    _train_step(eager, x, target)
    _train_step(fused, x, target)
    tol = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}[dtype]
    failures = []
    with torch.no_grad():
        pairs = [(n, p.grad, q.grad) for (n, p), q in zip(eager.named_parameters(), fused.parameters())]
        pairs += [(n, b, c) for (n, b), c in zip(eager.named_buffers(), fused.buffers()) if b.is_floating_point()]
        for name, a, b in pairs:
            err = ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-12)).item()
            if not err <= tol:
                failures.append(f"{name}: relative error {err:.2e} > {tol:.0e}")
    return failures


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m fused_resnet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="auto", choices=["auto", *backends.BACKENDS])
    parser.add_argument("--batch", type=int, default=128 if cuda else 16)
    parser.add_argument("--size", type=int, default=64 if cuda else 32, help="image height and width")
    parser.add_argument("--steps", type=int, default=20 if cuda else 5)
    parser.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    if args.batch < 2 or args.size < 4 or args.steps < 1:
        parser.error("need --batch >= 2, --size >= 4 and --steps >= 1")
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: CUDA is not available on this machine")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        backend = backends.resolve(None if args.backend == "auto" else args.backend, device)
    except backends.BackendUnavailableError as exc:
        parser.error(str(exc))

    info = backends.build_info()
    print(f"fused_resnet demo | torch {info['torch']} | device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''} | "
          f"backend {backend} | available {', '.join(backends.available_backends(device))}")
    print(f"SmallResNet (3 residual blocks), batch {args.batch}, {args.size}x{args.size}, {args.dtype} activations,"
          " channels_last, training step = forward + backward")

    torch.manual_seed(0)
    eager = SmallResNet(fused=False).to(device)
    fused = SmallResNet(fused=True, backend=backend).to(device)
    fused.load_state_dict(eager.state_dict())
    eager, fused = (m.to(memory_format=torch.channels_last) for m in (eager, fused))
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (args.batch,), device=device)

    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        failures = _check_parity(eager, fused, x, target, dtype)
        rows = []
        for name, model in (("eager PyTorch", eager), (f"fused ({backend})", fused)):
            ms = _time_steps(model, x, target, args.steps, device)
            saved = _saved_bytes(model, x, target) / 2**20
            rows.append((name, ms, saved))
    print("parity after one training step (grads and BN buffers):", "OK" if not failures else "FAILED")
    for f in failures:
        print("  " + f)
    print(f"\n| {'variant':<16} | {'ms/step (median of ' + str(args.steps) + ')':>24} | {'saved activations MiB':>22} |")
    print(f"|{'-' * 18}|{'-' * 26}|{'-' * 24}|")
    for name, ms, saved in rows:
        print(f"| {name:<16} | {ms:>24.2f} | {saved:>22.2f} |")
    base_ms, base_mem = rows[0][1], rows[0][2]
    print(f"\nfused vs eager: {base_ms / rows[1][1]:.2f}x speed, {rows[1][2] / base_mem:.2f}x saved activation memory")
    if device.type == "cpu":
        print("(CPU: the kernels here are the portable C++/eager paths; the speed targets are for CUDA GPUs.)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
