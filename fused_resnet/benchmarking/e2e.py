"""End-to-end ResNet training step and inference, measured per variant side by side in one process.

Variants:
  eager            torchvision's model (else the in-tree reference with the same architecture), eager PyTorch
  compile          torch.compile of it
  fused            fused_resnet's model, backend chosen automatically for the device
  fused-<backend>  fused_resnet's model on one backend (triton, cuda, cpu, eager)
  fused-compile    torch.compile of the fused model (automatic backend)
A fused variant may name its convolution setting, ``<variant>:conv=<setting>`` (dispatch.CONV_SETTINGS: an
implementation forced, triton / cuda / aten / gemm, or the measured per-shape selection, auto, or auto+cuda
with the compiled CUTLASS convolutions among its candidates), e.g. fused-triton:conv=cuda beside
fused-triton:conv=triton and fused-triton:conv=auto+cuda: each implementation and the selection in one run.
The setting holds during that variant's own steps only (dispatch.conv_setting).

Training step = forward + backward + SGD (momentum 0.9) on synthetic data under autocast; inference = eval
mode under torch.inference_mode. The variants run interleaved, one step of each per round, so that the rounds
pair their samples (measure_all). Every timed step is a sample (device-synchronised, after warm-up, in which
compilation happens); a record carries the samples and their summary (median, quartiles, min: stats.py), and
throughput is the batch over the median step time. Peak memory (CUDA): a variant's resident bytes plus the
largest rise of torch.cuda.memory_allocated during one of its timed training steps; saved activation bytes of
one training forward from saved_tensors_hooks (eager-mode variants only: a compiled graph saves what
AOTAutograd decides, outside the hooks' view).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .. import backends, dispatch
from ..models import BUILDERS, torchvision_reference
from .memory import saved_activation_bytes
from .report import dtype_name, triton_interpreted
from .stats import summarize
from .timing import synchronize

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


def split_variant(variant: str) -> tuple[str, str | None]:
    """(base variant, convolution setting or None) of ``<base>[:conv=<setting>]``; a ValueError for a
    malformed name, an unknown setting or a setting on a variant without fused convolutions."""
    base, sep, rest = variant.partition(":")
    if not sep:
        return variant, None
    if not rest.startswith("conv=") or rest[len("conv="):] not in dispatch.CONV_SETTINGS:
        raise ValueError(f"variant {variant!r}: after ':' expected conv=<setting>, setting one of "
                         f"{', '.join(dispatch.CONV_SETTINGS)}")
    if base in ("eager", "compile"):
        raise ValueError(f"variant {variant!r}: a convolution setting applies to the fused variants only")
    return base, rest[len("conv="):]


def check_variant(variant: str, device: torch.device) -> None:
    """A ValueError unless ``variant`` names a variant (with or without a convolution setting)."""
    base, _ = split_variant(variant)
    if base not in all_variants(device):
        raise ValueError(f"unknown variant {base!r}")


def conv_context(conv: str | None):
    """The context a variant's steps run in: its convolution setting, or none."""
    return dispatch.conv_setting(conv) if conv is not None else contextlib.nullcontext()


def variant_backend(variant: str, device: torch.device) -> str | None:
    """The fused backend a variant runs on (None for the eager model); raises BackendUnavailableError."""
    variant, _ = split_variant(variant)
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
    variant, _ = split_variant(variant)
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


class _Variant:
    """One variant ready to run: its model, optimizer, inputs and step functions."""

    def __init__(self, variant: str, cfg: E2EConfig, device: torch.device):
        torch.manual_seed(0)
        self.variant, self.cfg, self.device = variant, cfg, device
        self.conv = split_variant(variant)[1]
        self.conv_calls: dict | None = None  # {implementation: calls} of its first training step
        self.model, self.runner, self.source, self.backend = build(variant, cfg, device)
        self.x, self.target = make_inputs(cfg, device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def train_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        record = dispatch.recording_conv_choices() if self.conv_calls is None else contextlib.nullcontext()
        with conv_context(self.conv), record as counts:
            with autocast(self.cfg, self.device):
                loss = nn.functional.cross_entropy(self.runner(self.x), self.target)
            loss.backward()
        if self.conv_calls is None:
            self.conv_calls = dict(sorted(counts.items()))
        self.opt.step()

    def inference_step(self) -> None:
        with conv_context(self.conv), torch.inference_mode(), autocast(self.cfg, self.device):
            self.runner(self.x)

    def resident_bytes(self) -> int:
        """What this variant holds between steps: parameters, their gradients, buffers, optimizer state,
        inputs. (Its peak is this plus the rise in allocated memory during its own step.)"""
        tensors = [*self.model.parameters(), *self.model.buffers(), self.x, self.target]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [t for state in self.opt.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _interleaved(fns: list[Callable[[], None]], device: torch.device, steps: int, warmup: int,
                 resident: list[Callable[[], int]], on_step: Callable[[], None] | None):
    """``warmup`` untimed rounds, then ``steps`` timed rounds; a round runs each function once, in an order
    rotated every round (no variant always runs first, right after another's caches or frees). Each call is
    device-synchronised and timed on its own. Returns (samples per function, in round order; peak bytes per
    function on CUDA: its resident bytes plus the largest rise in allocated memory during one of its calls;
    NaN elsewhere)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        for fn in fns:
            fn()
            if on_step:
                on_step()
    synchronize(device)
    times = [[] for _ in fns]
    peaks = [math.nan] * len(fns)
    for k in range(steps):
        for i in [(k + j) % len(fns) for j in range(len(fns))]:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                own = resident[i]()
            t0 = time.perf_counter()
            fns[i]()
            synchronize(device)
            times[i].append(time.perf_counter() - t0)
            if cuda:
                rise = torch.cuda.max_memory_allocated(device) - before
                peaks[i] = max(0.0 if math.isnan(peaks[i]) else peaks[i], float(own + rise))
            if on_step:
                on_step()
    return times, peaks


def measure_all(variants: list[str], cfg: E2EConfig, device: torch.device,
                on_step: Callable[[], None] | None = None) -> list[dict]:
    """Every variant's training-step and inference throughput, peak memory and saved activation bytes, the
    variants interleaved step by step (``_interleaved``): sample k of every variant comes from round k, so a
    change in machine load during the run reaches all of them alike, and speed-ups are taken per round
    (``stats.paired_ratio``). Run one after another, a variant measured while another program was busy
    would carry that into the ratio unseen."""
    runs = [_Variant(v, cfg, device) for v in variants]
    for r in runs:
        r.model.train()
    train, train_peak = _interleaved([r.train_step for r in runs], device, cfg.steps, cfg.warmup,
                                     [r.resident_bytes for r in runs], on_step)
    saved = []
    for r in runs:
        value = math.nan
        if not split_variant(r.variant)[0].endswith("compile"):
            r.opt.zero_grad(set_to_none=True)
            with conv_context(r.conv), autocast(cfg, device):
                value = saved_activation_bytes(r.model, lambda: r.model(r.x))
        saved.append(value)
    infer = [None] * len(runs)
    if cfg.inference:
        for r in runs:
            r.model.eval()
        infer, _ = _interleaved([r.inference_step for r in runs], device, cfg.steps, cfg.warmup,
                                [r.resident_bytes for r in runs], on_step)
    results = []
    for i, r in enumerate(runs):
        t = summarize(train[i])
        f = summarize(infer[i]) if infer[i] else None
        results.append(dict(variant=r.variant, backend=r.backend, conv=r.conv, conv_calls=r.conv_calls,
                            model_source=r.source,
                            interpreted=r.backend == "triton" and triton_interpreted(), interleaved=True,
                            train_step_ms=t.scaled(1e3).to_dict(), train_img_per_s=cfg.batch / t.median,
                            infer_step_ms=f.scaled(1e3).to_dict() if f else None,
                            infer_img_per_s=cfg.batch / f.median if f else None,
                            peak_gib=train_peak[i] / 2**30, saved_mib=saved[i] / 2**20))
    runs.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


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


def first_step_parity(cfg: E2EConfig, device: torch.device, backend: str, conv: str | None = None) -> dict:
    """One training step (forward + backward) of the fused model on ``backend`` (convolution setting ``conv``:
    dispatch.CONV_SETTINGS, None for the process's own) and of the eager model, from
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
            with conv_context(conv if m is fused else None):
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
    return dict(backend=backend, conv=conv, ok=bool(forward_ok and grad_ok), reference_dtype=dtype_name(ref_dtype),
                forward_ok=bool(forward_ok), forward_worst=worst["name"], forward_fused_err=worst["fused_err"],
                forward_eager_err=worst["eager_err"], floor=floor, grad_ok=bool(grad_ok), grad_fused_err=grad_fused,
                grad_eager_err=grad_eager, grad_bound=grad_bound)


def config_dict(cfg: E2EConfig) -> dict:
    return asdict(cfg)


