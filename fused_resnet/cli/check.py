"""``fused-resnet check``: is this installation right on this device? For every backend that can run here:

  ops     the fused BatchNorm (+ residual) (+ ReLU) forward and backward in training and eval mode, on odd
          shapes and both memory formats, in every dtype the backend runs here (fp32; fp16/bf16 on CUDA; bf16
          on CPU except Triton's interpreter, which has no bf16), against a float64 reference. The test suite's
          rule: fused error <= 2 x eager PyTorch's error in the same dtype + a floor (fp32 1e-5, fp16 1e-3,
          bf16 1e-2), for the output, the running statistics and every gradient.
  model   one training step of a small ResNet-18 in float64 against the eager reference model: outputs,
          gradients and BN buffers within 1e-9 (exact arithmetic up to summation order; 1e-6 for Triton,
          whose statistics kernel keeps fp32 partial sums).

Backends that cannot run are listed with the reason (e.g. the compiled extension missing, no GPU, Triton on
CPU without TRITON_INTERPRET=1). Exit code 0 when everything that ran passed, 1 otherwise.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from .. import backends
from ..benchmarking.e2e import build_eager
from ..benchmarking.report import dtype_name, triton_interpreted
from ..models import BUILDERS
from ..ops import batch_norm_act
from .common import CLIError, Progress, ResultWriter, add_common_arguments, format_table, resolve_device, result_document

HELP = "parity check of this installation on this device, every available backend"
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# (N, C, H, W), residual, relu: odd channel counts, a 1x1 map, a batch of 2, non-square maps.
OP_CASES = [((3, 65, 7, 9), True, True), ((2, 129, 1, 1), False, True), ((4, 64, 14, 14), False, False),
            ((2, 3, 5, 5), True, False)]
# float64 model step: exact up to summation order, except Triton's statistics kernel, whose per-program Welford
# partials are fp32 whatever the input dtype (fp32-level agreement is what it can give).
MODEL_TOLERANCE = {"triton": 1e-6}
MODEL_TOLERANCE_DEFAULT = 1e-9


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("check", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=None, help="comma-separated subset of triton, cuda, cpu, eager "
                                                    "(default: every backend that can run on the device)")
    p.add_argument("--no-model", action="store_true", help="skip the model check")
    add_common_arguments(p, "fused_resnet_results")
    p.set_defaults(run=run)


def _dtypes(backend: str, device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    return [torch.float32] if backend == "triton" else [torch.float32, torch.bfloat16]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _run_op(backend, x, residual, relu, weight, bias, training, grad):
    """Forward + backward of one implementation; ``backend=None`` is eager PyTorch (nn.functional)."""
    x = x.detach().clone().requires_grad_()
    r = residual.detach().clone().requires_grad_() if residual is not None else None
    w, b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    c = x.shape[1]
    rm = torch.linspace(-0.5, 0.5, c, device=x.device, dtype=torch.float64).to(w.dtype)
    rv = torch.linspace(0.5, 2.0, c, device=x.device, dtype=torch.float64).to(w.dtype)
    if backend is None:
        y = nn.functional.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
        y = y + r if r is not None else y
        y = torch.relu(y) if relu else y
    else:
        y = batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5, residual=r, relu=relu, backend=backend)
    y.backward(grad)
    named = dict(out=y, running_mean=rm, running_var=rv, grad_x=x.grad, grad_weight=w.grad, grad_bias=b.grad)
    if r is not None:
        named["grad_residual"] = r.grad
    return named


def check_op(backend: str, device: torch.device, dtype: torch.dtype, shape, with_residual: bool, relu: bool,
             training: bool, channels_last: bool) -> dict:
    g = torch.Generator().manual_seed(hash((shape, with_residual, relu, training)) % 2**31)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*s, scale=2.0, shift=0.5):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift

    x64 = rand(*shape).to(device).contiguous(memory_format=fmt)
    r64 = rand(*shape).to(device).contiguous(memory_format=fmt) if with_residual else None
    grad64 = rand(*shape, scale=1.0, shift=0.0).to(device).contiguous(memory_format=fmt)
    w64 = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).to(device)
    b64 = (torch.rand(shape[1], generator=g, dtype=torch.float64) - 0.5).to(device)

    def low(t):
        return None if t is None else t.to(dtype)

    def up(t):
        return None if t is None else t.double()

    # The reference starts from the same rounded inputs: only the arithmetic differs.
    args = (low(x64), low(r64), relu, w64.float(), b64.float(), training, low(grad64))
    ref = _run_op(None, up(args[0]), up(args[1]), relu, up(args[3]), up(args[4]), training, up(args[6]))
    eager = _run_op(None, *args)
    fused = _run_op(backend, *args)
    failures, largest = [], ("", 0.0, 0.0)
    for name, ref_t in ref.items():
        if not training and name.startswith("running"):
            continue  # eval mode leaves them alone
        e_fused, e_eager = _rel(fused[name], ref_t), _rel(eager[name], ref_t)
        if not (bool(torch.isfinite(fused[name]).all()) and e_fused <= 2 * e_eager + FLOOR[dtype]):
            failures.append((name, e_fused, e_eager))
        if e_fused > largest[1]:
            largest = (name, e_fused, e_eager)
    ok = not failures
    worst = failures[0] if failures else largest
    return dict(kind="op", backend=backend, dtype=dtype_name(dtype), shape=list(shape),
                residual=with_residual, relu=relu, training=training, channels_last=channels_last, ok=bool(ok),
                worst=worst[0], fused_err=worst[1], eager_err=worst[2])


def check_model(backend: str, device: torch.device) -> dict:
    """One float64 training step of ResNet-18 (batch 4, 64x64) against the eager reference model."""
    torch.manual_seed(0)
    eager, _ = build_eager("resnet18", 10)
    fused = BUILDERS["resnet18"](num_classes=10, backend=backend)
    fused.load_state_dict(eager.state_dict())
    eager, fused = (m.to(device, torch.float64).to(memory_format=torch.channels_last).train() for m in (eager, fused))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=g, dtype=torch.float64).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (4,), generator=g).to(device)
    outs = []
    for m in (eager, fused):
        out = m(x)
        nn.functional.cross_entropy(out, target).backward()
        outs.append(out.detach())
    pairs = [("logits", outs[1], outs[0])]
    fused_params, fused_buffers = dict(fused.named_parameters()), dict(fused.named_buffers())
    pairs += [(n + ".grad", fused_params[n].grad, p.grad) for n, p in eager.named_parameters()]
    pairs += [(n, fused_buffers[n], b) for n, b in eager.named_buffers() if b.is_floating_point()]
    errors = [(n, _rel(f, e)) for n, f, e in pairs]
    name, err = max(errors, key=lambda t: t[1] if t[1] == t[1] else float("inf"))
    tolerance = MODEL_TOLERANCE.get(backend, MODEL_TOLERANCE_DEFAULT)
    ok = all(e <= tolerance for _, e in errors)
    return dict(kind="model", backend=backend, dtype="fp64", shape=[4, 3, 64, 64], ok=bool(ok), worst=name,
                fused_err=err, eager_err=0.0, tolerance=tolerance)


def run(args) -> int:
    device = resolve_device(args.device)
    status = {b: backends.backend_status(b, device) for b in backends.BACKENDS}
    selected = list(backends.BACKENDS)
    if args.backends:
        selected = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in selected if b not in backends.BACKENDS]
        if unknown or not selected:
            raise CLIError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; choose from "
                           f"{', '.join(backends.BACKENDS)}")
    runnable = [b for b in selected if status[b][0]]
    plan = [(b, dt, case, training, cl) for b in runnable for dt in _dtypes(b, device) for case in OP_CASES
            for training in (True, False) for cl in (True, False)]
    with ResultWriter(args.out) as writer:
        results = []
        with Progress(len(plan) + (0 if args.no_model else len(runnable)), "check", enabled=not args.quiet) as bar:
            for b, dt, (shape, res, relu), training, cl in plan:
                try:
                    results.append(check_op(b, device, dt, shape, res, relu, training, cl))
                except Exception as exc:  # noqa: BLE001 - a crash of a backend is a failed check, reported
                    results.append(dict(kind="op", backend=b, dtype=dtype_name(dt), shape=list(shape),
                                        ok=False, worst=f"raised {type(exc).__name__}: {exc}", fused_err=None,
                                        eager_err=None))
                bar.update(info=b)
            if not args.no_model:
                for b in runnable:
                    try:
                        results.append(check_model(b, device))
                    except Exception as exc:  # noqa: BLE001
                        results.append(dict(kind="model", backend=b, dtype="fp64", ok=False,
                                            worst=f"raised {type(exc).__name__}: {exc}", fused_err=None,
                                            eager_err=None))
                    bar.update(info=f"model {b}")
        for r in results:
            r["interpreted"] = r["backend"] == "triton" and triton_interpreted()
        info = backends.build_info()
        print(f"\nfused_resnet check | device {device} | torch {torch.__version__} | extension: "
              f"{'loaded' if backends.extension_loaded() else 'NOT loaded'}")
        rows = []
        for b in backends.BACKENDS:
            if b not in selected:
                continue
            if not status[b][0]:
                rows.append([b, "-", "-", "skipped", status[b][1]])
                continue
            for kind in ("op", "model"):
                for dt in sorted({r["dtype"] for r in results if r["backend"] == b and r["kind"] == kind}):
                    mine = [r for r in results if r["backend"] == b and r["kind"] == kind and r["dtype"] == dt]
                    failed = [r for r in mine if not r["ok"]]
                    worst = (failed or sorted(mine, key=lambda r: -(r["fused_err"] or 0)))[0]
                    err = worst["fused_err"]
                    rows.append([b, kind, dt, f"{len(mine) - len(failed)}/{len(mine)} passed",
                                 f"worst {worst['worst']}" + (f" {err:.1e}" if err is not None else "")
                                 + (f" (eager {worst['eager_err']:.1e})" if worst.get("eager_err") else "")])
        print(format_table(["backend", "check", "dtype", "result", "detail"], rows))
        ok = all(r["ok"] for r in results) and bool(results)
        print("all checks passed" if ok else ("nothing could run" if not results else "SOME CHECKS FAILED"))
        writer.write_json("check.json", result_document(
            "check", getattr(args, "argv", None), device, dict(backends=selected, model=not args.no_model), results,
            backend_status={b: dict(available=s[0], reason=s[1]) for b, s in status.items()}, build_info=info,
            ok=ok))
        writer.finish()
    return 0 if ok else 1
