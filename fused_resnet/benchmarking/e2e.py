"""End-to-end ResNet training step and inference, measured per variant side by side in one process.

Variants:
  eager            torchvision's model (else the in-tree reference with the same architecture), eager PyTorch
  compile          torch.compile of it
  fused            fused_resnet's model, backend chosen automatically for the device
  fused-<backend>  fused_resnet's model on one backend (triton, cuda, cpu, eager)
  fused-compile    torch.compile of the fused model (automatic backend)

Training step = forward + backward + SGD (momentum 0.9) on synthetic data under autocast; inference = eval
mode under torch.inference_mode. Every timed step is a sample (device-synchronised, after warm-up, in which
compilation happens); a record carries the samples and their summary (median, quartiles, min: stats.py), and
throughput is the batch over the median step time. Peak memory from torch.cuda.max_memory_allocated over the
timed training steps; saved activation bytes of one training forward from saved_tensors_hooks (eager-mode
variants only: a compiled graph saves what AOTAutograd decides, outside the hooks' view).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .. import backends
from ..models import BUILDERS, torchvision_reference
from .memory import saved_activation_bytes
from .report import dtype_name, triton_interpreted
from .timing import step_times

BASE_VARIANTS = ("eager", "compile", "fused", "fused-compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class E2EConfig:
    arch: str = "resnet50"
    batch: int = 256
    size: int = 224
    dtype: str = "bf16"            # autocast dtype ("fp32": no autocast)
    channels_last: bool = True
    steps: int = 20                # timed steps (one sample each)
    warmup: int = 5
    num_classes: int = 1000
    inference: bool = True         # also time eval-mode inference


def all_variants(device: torch.device) -> list[str]:
    """Every variant name valid on ``device`` (runnable or not)."""
    return [*BASE_VARIANTS, *(f"fused-{b}" for b in backends.BACKENDS)]


def default_variants(device: torch.device) -> list[str]:
    """What a plain run measures: on CUDA eager, compile, each GPU backend, fused+compile; on CPU eager and the
    fused model on the fastest CPU backend (torch.compile of a ResNet takes minutes on a small CPU)."""
    if device.type == "cuda":
        fused = [f"fused-{b}" for b in ("triton", "cuda") if backends.backend_status(b, device)[0]]
        return ["eager", "compile", *(fused or ["fused"]), "fused-compile"]
    return ["eager", "fused"]


def variant_backend(variant: str, device: torch.device) -> str | None:
    """The fused backend a variant runs on (None for the eager model); raises BackendUnavailableError."""
    if variant in ("eager", "compile"):
        return None
    requested = variant[len("fused-"):] if variant.startswith("fused-") and variant != "fused-compile" else None
    return backends.resolve(requested, device)


def build_eager(arch: str, num_classes: int) -> tuple[nn.Module, str]:
    try:
        import torchvision

        return getattr(torchvision.models, arch)(num_classes=num_classes), "torchvision"
    except Exception:  # noqa: BLE001 - torchvision missing or unusable with this torch
        return torchvision_reference.build(arch, num_classes=num_classes), "in-tree reference"


def build(variant: str, cfg: E2EConfig, device: torch.device):
    """(model, the callable that runs it (compiled or not), where the model comes from, backend)."""
    backend = variant_backend(variant, device)
    if backend is None:
        model, source = build_eager(cfg.arch, cfg.num_classes)
    else:
        model, source = BUILDERS[cfg.arch](num_classes=cfg.num_classes, backend=backend), "fused_resnet"
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if variant.endswith("compile") else model
    return model, runner, source, backend


def make_inputs(cfg: E2EConfig, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, generator=g).to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=g).to(device)
    return x, target


def autocast(cfg: E2EConfig, device: torch.device):
    dtype = DTYPES[cfg.dtype]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def measure(variant: str, cfg: E2EConfig, device: torch.device, on_step: Callable[[], None] | None = None) -> dict:
    """One variant: training-step and inference throughput, peak memory, saved activation bytes."""
    torch.manual_seed(0)
    model, runner, source, backend = build(variant, cfg, device)
    x, target = make_inputs(cfg, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast(cfg, device):
            loss = nn.functional.cross_entropy(runner(x), target)
        loss.backward()
        opt.step()

    def inference_step():
        with torch.inference_mode(), autocast(cfg, device):
            runner(x)

    model.train()
    train, train_peak = step_times(train_step, device, cfg.steps, cfg.warmup, on_step)
    saved = float("nan")
    if not variant.endswith("compile"):
        opt.zero_grad(set_to_none=True)
        with autocast(cfg, device):
            saved = saved_activation_bytes(model, lambda: model(x))
    infer = None
    if cfg.inference:
        model.eval()
        infer, _ = step_times(inference_step, device, cfg.steps, cfg.warmup, on_step)
    model = runner = opt = None  # free the device memory before the next variant (the closures share these cells)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(variant=variant, backend=backend, model_source=source,
                interpreted=backend == "triton" and triton_interpreted(),
                train_step_ms=train.scaled(1e3).to_dict(), train_img_per_s=cfg.batch / train.median,
                infer_step_ms=infer.scaled(1e3).to_dict() if infer else None,
                infer_img_per_s=cfg.batch / infer.median if infer else None,
                peak_gib=train_peak / 2**30, saved_mib=saved / 2**20)


def steps_per_variant(cfg: E2EConfig) -> int:
    """Calls of the step function per variant (for progress bars)."""
    return (cfg.steps + cfg.warmup) * (1 + cfg.inference)


FLOOR = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2}
# Gradients of one step may differ by more than rounding: a pre-ReLU value within rounding of zero takes the
# other side of the ReLU in one of the two runs (it happens to eager PyTorch against float64 too), and every
# gradient upstream of it moves by about 1% (seen in fp32 on ResNet-18). The gradient check therefore uses
# the global relative L2 error over all parameter gradients with this allowance; a kernel bug shows up as
# errors near 1 and in the forward quantities, which have no such discontinuity and keep the strict rule.
GRAD_ALLOWANCE = {"fp32": 2e-2, "fp16": 1e-1, "bf16": 1e-1}


def first_step_parity(cfg: E2EConfig, device: torch.device, backend: str) -> dict:
    """One training step (forward + backward) of the fused model on ``backend`` and of the eager model, from
    the same weights and batch, against a higher-precision eager reference (float64 on CPU or for fp32 runs;
    fp32 with TF32 off for autocast runs on CUDA).

    Forward quantities (logits, loss, BN running statistics): the test suite's rule, fused error (max |a - ref|
    / max |ref|) <= 2 x eager error in the same dtype + floor (fp32 1e-5, fp16 1e-3, bf16 1e-2).
    Gradients: global relative L2 error <= max(2 x eager's, GRAD_ALLOWANCE) (see GRAD_ALLOWANCE)."""
    torch.manual_seed(0)
    eager, _ = build_eager(cfg.arch, cfg.num_classes)
    reference, _ = build_eager(cfg.arch, cfg.num_classes)
    fused = BUILDERS[cfg.arch](num_classes=cfg.num_classes, backend=backend)
    reference.load_state_dict(eager.state_dict())
    fused.load_state_dict(eager.state_dict())
    ref_dtype = torch.float32 if device.type == "cuda" and cfg.dtype != "fp32" else torch.float64
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    eager, fused = (m.to(device).to(memory_format=fmt).train() for m in (eager, fused))
    reference = reference.to(device, ref_dtype).to(memory_format=fmt).train()
    x, target = make_inputs(cfg, device, seed=1)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        logits, losses = [], []
        for m, low_precision in ((reference, False), (eager, True), (fused, True)):
            inp = x.to(ref_dtype) if m is reference else x
            with autocast(cfg, device) if low_precision else torch.autocast(device.type, enabled=False):
                out = m(inp)
                loss = nn.functional.cross_entropy(out, target)
            loss.backward()
            logits.append(out.detach())
            losses.append(loss.detach())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def rel(a, ref):
        a, ref = a.detach().double(), ref.detach().double()
        return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    floor = FLOOR[cfg.dtype]
    forward = [("logits", logits[0], logits[1], logits[2]), ("loss", losses[0], losses[1], losses[2])]
    eager_buffers, fused_buffers = dict(eager.named_buffers()), dict(fused.named_buffers())
    forward += [(n, b, eager_buffers[n], fused_buffers[n]) for n, b in reference.named_buffers()
                if b.is_floating_point()]
    worst = dict(name="", fused_err=0.0, eager_err=0.0, margin=-math.inf)
    forward_ok = True
    for name, ref, e, f in forward:
        e_fused, e_eager = rel(f, ref), rel(e, ref)
        margin = e_fused - (2 * e_eager + floor)  # > 0: the rule fails for this quantity
        forward_ok = forward_ok and math.isfinite(e_fused) and margin <= 0
        if not math.isfinite(e_fused) or margin > worst["margin"]:
            worst = dict(name=name, fused_err=e_fused, eager_err=e_eager, margin=margin)

    eager_params, fused_params = dict(eager.named_parameters()), dict(fused.named_parameters())
    sq = {"ref": 0.0, "eager": 0.0, "fused": 0.0}
    for n, p in reference.named_parameters():
        ref = p.grad.double()
        sq["ref"] += ref.square().sum().item()
        sq["eager"] += (eager_params[n].grad.double() - ref).square().sum().item()
        sq["fused"] += (fused_params[n].grad.double() - ref).square().sum().item()
    grad_fused, grad_eager = (math.sqrt(sq[k] / max(sq["ref"], 1e-300)) for k in ("fused", "eager"))
    grad_bound = max(2 * grad_eager, GRAD_ALLOWANCE[cfg.dtype])
    grad_ok = math.isfinite(grad_fused) and grad_fused <= grad_bound
    return dict(backend=backend, ok=bool(forward_ok and grad_ok), reference_dtype=dtype_name(ref_dtype),
                forward_ok=bool(forward_ok), forward_worst=worst["name"], forward_fused_err=worst["fused_err"],
                forward_eager_err=worst["eager_err"], floor=floor, grad_ok=bool(grad_ok), grad_fused_err=grad_fused,
                grad_eager_err=grad_eager, grad_bound=grad_bound)


def config_dict(cfg: E2EConfig) -> dict:
    return asdict(cfg)


