"""The kernel launches fused_resnet would make for ResNet-50 at batch 256, recorded without running them.

``record_resnet50`` runs the real launchers on meta tensors with the GPU tile configurations forced, and
records each Triton kernel launch (kernel, grid, arguments, constexprs, num_warps, num_stages) instead of
running it. ``specialise`` turns one into Triton's own specialisation of it (the JIT's native_specialize_impl:
int 1 -> constexpr, 16-divisible ints and pointers -> tt.divisibility) and ``key`` identifies the compiled
kernel it needs.

Two users: the GPU-free compile check (tests/triton_compile.py: triton.compile for sm_90, registers, spills,
wgmma) and the cache warm-up (fused_resnet/kernels/warmup.py: the same kernels compiled on the GPU in
parallel processes, before a benchmark pays for them one by one).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

SM_COUNT = 132  # H100 SXM and H200: the grid sizes the launchers plan for


@dataclass
class Launch:
    kernel: object          # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    label: str = ""


class _Recorder:
    def __init__(self, fn, sink, label_fn):
        self.fn, self.sink, self.label_fn = fn, sink, label_fn
        self.arg_names = fn.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.fn, args, kwargs, grid, self.label_fn()))
        return launch


@contextlib.contextmanager
def recording(monkeypatch_setattr, label_fn):
    """Replace every Triton kernel of fused_resnet.kernels by a recorder for the duration."""
    import triton

    from fused_resnet.kernels import batch_norm, conv_bwd, conv_configs, conv_fwd

    sink: list = []
    for mod in (batch_norm, conv_fwd, conv_bwd):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                monkeypatch_setattr(mod, name, _Recorder(obj, sink, label_fn))
    monkeypatch_setattr(conv_configs, "gpu_tiles", lambda device: True)
    monkeypatch_setattr(conv_configs, "_sm_count", lambda device: SM_COUNT)
    yield sink


def resnet50_convs(batch: int = 256) -> list:
    """Every distinct convolution of ResNet-50 at ``batch`` x 224 x 224: (input shape, conv module)."""
    from fused_resnet.models import torchvision_reference as ref

    with torch.device("meta"):
        model = ref.build("resnet50").eval()  # eval: shapes only (a training BN refuses one value per channel)
    seen, out = set(), []

    def hook(m, args, _):
        key = (tuple(args[0].shape), tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups)
        if key not in seen:
            seen.add(key)
            out.append((tuple(args[0].shape), m))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model(torch.empty(batch, 3, 224, 224, device="meta"))
    for h in handles:
        h.remove()
    return out


def record_resnet50(monkeypatch_setattr, dtypes=(torch.bfloat16, torch.float32)) -> list:
    """The launches of every kernel at every ResNet-50 shape (batch 256): the convolutions' forward (statistics
    epilogue with and without the BatchNorm prologue, and the eval epilogue), dgrad and wgrad, and the
    BatchNorm kernels at the BatchNorm shapes."""
    from fused_resnet.kernels import batch_norm as bn
    from fused_resnet.kernels.conv_bwd import conv_dgrad, conv_dgrad_bn, conv_wgrad
    from fused_resnet.kernels.conv_fwd import conv_fwd

    label = {"text": ""}
    meta = dict(device="meta")
    with recording(monkeypatch_setattr, lambda: label["text"]) as sink:
        for dtype in dtypes:
            bn_shapes = set()
            for shape, conv in resnet50_convs():
                cl = dict(memory_format=torch.channels_last)
                x = torch.empty(shape, dtype=dtype, **meta).contiguous(**cl)
                w = torch.empty(conv.weight.shape, dtype=dtype, **meta).contiguous(**cl)
                c, k = shape[1], w.shape[0]
                per_c = lambda n: torch.empty(n, dtype=torch.float32, **meta)  # noqa: E731
                args = (conv.stride, conv.padding, conv.dilation, conv.groups)
                name = f"{tuple(w.shape)} s{conv.stride[0]} {str(dtype).split('.')[-1]}"
                label["text"] = f"fwd+stats {name}"
                y, _ = conv_fwd(x, w, *args, stats=True)
                if c > 3:
                    label["text"] = f"bn->fwd+stats {name}"
                    conv_fwd(x, w, *args, prologue=(per_c(c), per_c(c), per_c(c), per_c(c), True), stats=True)
                label["text"] = f"fwd+bias+res+relu {name}"
                conv_fwd(x, w, *args, bias=per_c(k), residual=y, relu=True)
                label["text"] = f"dgrad {name}"
                conv_dgrad(y, w, x.shape, *args, dtype)
                if c > 3:
                    label["text"] = f"dgrad+relu+bn-reduce {name}"
                    conv_dgrad_bn(y, w, x, per_c(c), per_c(c), per_c(c), per_c(c), True, *args)
                label["text"] = f"wgrad {name}"
                conv_wgrad(y, x, w.shape, *args, dtype,
                           prologue=(per_c(c), per_c(c), per_c(c), per_c(c), True) if c > 3 else None)
                bn_shapes.add(tuple(y.shape))
            for shape in sorted(bn_shapes):
                x = torch.empty(shape, dtype=dtype, **meta).contiguous(memory_format=torch.channels_last)
                c = shape[1]
                acc = torch.empty(c, dtype=torch.float32, **meta)
                label["text"] = f"bn {shape} {str(dtype).split('.')[-1]}"
                bn.bn_stats(x)
                bn.bn_finalize(torch.empty(3, c, dtype=torch.float64, **meta), acc.clone(), acc.clone(), None, 0.1,
                               1e-5, torch.float32)
                bn.bn_act(x, acc, acc, acc, acc, x, True)
                bn.bn_backward_reduce(x, x, acc, acc, acc, acc, x, True)
                bn.bn_backward_elemt(x, x, acc, acc, acc, acc, x, torch.empty(2, c, **meta), acc, True, True)
    return sink


def specialise(launch: Launch, target_sm: int = 90):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT would specialise this launch."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.runtime.jit import native_specialize_impl

    fn = launch.kernel
    backend = triton.compiler.make_backend(GPUTarget("cuda", target_sm, 32))
    values = dict(zip(fn.arg_names, launch.args))
    options = {k: v for k, v in launch.kwargs.items() if k not in fn.arg_names}
    values.update({k: v for k, v in launch.kwargs.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize, True)
        if kind == "constexpr":
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name] = kind
        if spec:
            attrs[(i,)] = backend.parse_attr(spec)
    return signature, constexprs, attrs, options


def _arg_class(value):
    """What Triton's JIT specialises a runtime argument on: a tensor's dtype (pointers are 16-byte aligned),
    an int's width, == 1 and divisibility by 16, a float's type."""
    if isinstance(value, torch.Tensor):
        return ("ptr", str(value.dtype))
    if isinstance(value, bool):
        return ("bool",)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, -2 ** 31 <= value < 2 ** 31)
    return (type(value).__name__,)


def key(launch: Launch) -> tuple:
    """Identifies the compiled kernel a launch needs (Triton-version independent): kernel, the runtime
    arguments' specialisation classes, constexprs and launch options."""
    fn = launch.kernel
    values = dict(zip(fn.arg_names, launch.args))
    values.update(launch.kwargs)
    classes = tuple((name, str(values[name]) if param.is_constexpr else _arg_class(values[name]))
                    for name, param in zip(fn.arg_names, fn.params))
    options = tuple(sorted((k, v) for k, v in launch.kwargs.items() if k not in fn.arg_names))
    return (fn.fn.__name__, classes, options)
