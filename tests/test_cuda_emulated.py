"""The CUDA implementation (csrc/cuda/) run without a GPU: the bindings, launchers and kernels, compiled from
the current sources for the CPU emulator of the CUDA execution model in tests/cuda_emulation/, compared with
the C++ CPU twin (torch.ops.fused_resnet_C on CPU tensors).

Exercised for real: the bindings' checks, kernel_layout copies, output allocation and launch checks
(batch_norm_cuda_ops.cpp); block shape, vector width, grid sizing and the number of reduction partials
(batch_norm_launch.cu); the kernels' thread/block decomposition, shared-memory tree reductions, vector
loads/stores, grid-stride loops (batch_norm_kernels.cuh). Not exercised (see emulator.h): warp-level
behaviour, data races beyond barrier semantics, registers/occupancy, nvcc's FMA contraction, performance.
The GPU parity tests (test_batch_norm_parity.py on a CUDA machine) remain the final word on those.

Comparison rules
  * Elementwise outputs (bn_act, bn_backward_elemt, bn_finalize): bitwise equal to the CPU twin, with the
    same strides. Both evaluate the same formulas (csrc/common/bn_math.h) in the same precision without FMA
    contraction (the emulated build uses -ffp-contract=off; the CPU twin is compiled for baseline x86-64,
    which has no FMA). Elsewhere (aarch64 has FMA in its baseline ISA) agreement to 2 ulp is asserted.
  * Reductions (bn_stats, bn_backward_reduce): the GPU's summation order differs from the CPU's, so within
    rtol 1e-5 (fp32 accumulation) / 1e-12 (fp64) of the sum of the magnitudes of the summed terms (for the
    statistics' mean and m2, see stats_magnitude).
  * Outputs and scratch are NaN-poisoned (tests/conftest.py: deterministic algorithms with
    fill_uninitialized_memory) and the emulator poisons shared memory, so unwritten elements show up.

Build: once per module, into pytest's tmp dir (or $FUSED_RESNET_EMU_BUILD_DIR), ~15 s. Skipped only when the
CUDA toolkit headers are missing; a failed source rewrite or compile fails the tests.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys

import pytest
import torch

from fused_resnet import backends

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _load_build_module():
    path = os.path.join(HERE, "cuda_emulation", "build.py")
    spec = importlib.util.spec_from_file_location("fused_resnet_cuda_emulation_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before exec: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


emu_build = _load_build_module()

TESTED_OPS = {"bn_stats", "bn_finalize", "bn_act", "bn_backward_reduce", "bn_backward_elemt", "bn_prologue_half"}
# Ops of csrc/ops.cpp deliberately not emulated: their CUDA implementation is tensor-core code (CUTLASS,
# csrc/cuda/conv/, which the emulator build does not read), compile-checked by scripts/check_cuda_compile.sh
# and tested against its CPU twin's contract in tests/test_conv_compiled.py; GPU parity is for a CUDA machine.
NOT_EMULATED = {"conv_fwd": "CUTLASS tensor-core kernels (csrc/cuda/conv/)",
                "conv_wgrad": "CUTLASS tensor-core kernels (csrc/cuda/conv/)",
                "conv_dgrad": "CUTLASS tensor-core kernels (csrc/cuda/conv/)",
                "conv_dgrad_bn": "CUTLASS tensor-core kernels (csrc/cuda/conv/)"}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BITWISE = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}
BLOCK_THREADS = 256  # kBlockThreads: every kernel's block size (batch_norm_kernels.cuh)

R = torch.ops.fused_resnet_C  # the CPU twin


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    reason = emu_build.cuda_headers_missing_reason()
    if reason:
        pytest.skip(f"CUDA emulation needs the CUDA toolkit headers: {reason}")
    assert backends.extension_loaded(), ("the C++ CPU twin (fused_resnet._C) is not built; the emulated CUDA "
                                         "kernels are compared with it (run scripts/setup_env.sh)")
    build_dir = os.environ.get("FUSED_RESNET_EMU_BUILD_DIR") or str(tmp_path_factory.mktemp("cuda_emulation"))
    # Any error here (a source rewrite that no longer matches, a compile error) fails the tests.
    module = emu_build.build_emulated_extension(build_dir)
    yield module


def _fresh(emu, sm_count: int = 4, schedule: str = "alternate") -> None:
    # The comparisons rely on NaN-poisoned outputs (tests/conftest.py's autouse fixture).
    assert torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory, \
        "tests/conftest.py no longer poisons uninitialised memory; unwritten outputs would go unnoticed"
    emu.set_sm_count(sm_count)
    emu.set_schedule(schedule)
    emu.take_launch_log()


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rtol_of(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


# ---------------------------------------------------------------------------------------------------------
# Comparison helpers: each returns None or a description of the mismatch.

def diff_exact(got: torch.Tensor, want: torch.Tensor):
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} != CPU twin {tuple(want.shape)} {want.dtype}"
    if got.numel() == 0:
        return None
    if got.stride() != want.stride():
        return f"strides {got.stride()} != CPU twin {want.stride()}"
    if not got.is_floating_point():
        return None if torch.equal(got, want) else "values differ"
    both_nan = got.isnan() & want.isnan()
    if BITWISE:
        same = got.contiguous().view(INT_VIEW[got.dtype]) == want.contiguous().view(INT_VIEW[want.dtype])
    else:
        eps = torch.finfo(got.dtype).eps
        same = (got.double() - want.double()).abs() <= 2 * eps * want.double().abs() + torch.finfo(got.dtype).tiny
    bad = ~(same | both_nan)
    if not bad.any():
        return None
    idx = tuple(int(i) for i in bad.nonzero()[0])
    only_nan = int((got.isnan() & ~want.isnan()).sum())
    return (f"{int(bad.sum())}/{got.numel()} elements differ{' bitwise' if BITWISE else ' by > 2 ulp'} (first at "
            f"{idx}: {got[idx].item()!r} vs CPU twin {want[idx].item()!r}); {only_nan} NaN only in the emulated "
            f"output (unwritten elements?)")


def diff_sums(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, rtol: float):
    """|got - want| <= rtol * magnitude elementwise (magnitude: sum of |terms| of each sum)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} != CPU twin {tuple(want.shape)} {want.dtype}"
    if got.numel() == 0:
        return None
    if got.stride() != want.stride():
        return f"strides {got.stride()} != CPU twin {want.stride()}"
    if not torch.isfinite(got).all():
        return f"{int((~torch.isfinite(got)).sum())} non-finite values (unwritten elements?): {got}"
    err = (got.double() - want.double()).abs()
    bound = rtol * magnitude.double() + 1e-300
    if (err <= bound).all():
        return None
    i = int((err / bound).argmax())
    return (f"error {err.flatten()[i].item():.3e} > {rtol:g} x magnitude {magnitude.double().flatten()[i].item():.3e} "
            f"at flat index {i} (emulated {got.flatten()[i].item()!r}, CPU twin {want.flatten()[i].item()!r})")


def stats_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per row of the (count, mean, m2) statistics, the magnitude its rounding errors scale with: the count;
    the mean of |x|; for m2 the sum of squared deviations plus n times the largest one (each chunk accumulates
    deviations from its own first row, at most max |x - mean| from the mean)."""
    xd = x.double()
    n = float(x.numel() // max(x.shape[1], 1))
    if x.numel() == 0:
        return torch.zeros((3, x.shape[1]), dtype=torch.float64)
    dev2 = (xd - xd.mean(dim=(0, 2, 3), keepdim=True)) ** 2
    return torch.stack([torch.full((x.shape[1],), n, dtype=torch.float64), xd.abs().sum(dim=(0, 2, 3)) / max(n, 1.0),
                        dev2.sum(dim=(0, 2, 3)) + n * dev2.amax(dim=(0, 2, 3))])


def reduce_magnitude(go, x, mean, invstd) -> torch.Tensor:
    g = go.double().abs()
    xhat = ((x.double() - mean.double().view(1, -1, 1, 1)) * invstd.double().view(1, -1, 1, 1)).abs()
    return torch.stack([g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))])


class Failures:
    def __init__(self):
        self.messages = []
        self.checks = 0

    def add(self, case: str, problem) -> None:
        self.checks += 1
        if problem is not None:
            self.messages.append(f"{case}: {problem}")

    def assert_none(self) -> None:
        shown = "\n  ".join(self.messages[:30])
        more = f"\n  ... and {len(self.messages) - 30} more" if len(self.messages) > 30 else ""
        assert not self.messages, f"{len(self.messages)} of {self.checks} checks failed:\n  {shown}{more}"


# ---------------------------------------------------------------------------------------------------------
# Inputs

def make(shape, dtype, layout, mean=0.0, std=1.0):
    """A random tensor of `shape` in one of the layouts the ops accept (float64 draw rounded to dtype)."""
    N, C, H, W = shape
    cl = torch.channels_last

    def base(*size):
        return (torch.randn(*size, dtype=torch.float64) * std + mean).to(dtype)

    if layout == "nchw":
        t = base(N, C, H, W)
    elif layout == "channels_last":
        t = base(N, C, H, W).contiguous(memory_format=cl)
    elif layout == "cl_cslice_misaligned":  # base one element off, s_hw = C + 1: scalar accesses
        t = base(N, C + 1, H, W).contiguous(memory_format=cl)[:, 1:]
    elif layout == "cl_cslice_aligned":  # vector accesses with s_hw = C + 8
        t = base(N, C + 8, H, W).contiguous(memory_format=cl)[:, 8:]
    elif layout == "cl_cslice_offset":  # s_hw = C + 8 but the base one element off
        t = base(N, C + 8, H, W).contiguous(memory_format=cl)[:, 1:C + 1]
    elif layout == "nchw_cslice":
        t = base(N, C + 2, H, W)[:, 2:]
    elif layout == "nslice":  # s_n = 2 * HW * s_hw: rows not merged
        t = base(2 * N, C, H, W).contiguous(memory_format=cl)[::2]
    elif layout == "hslice_cl":  # H slice of channels_last: H and W merge, rows not merged
        t = base(N, C, H + 2, W).contiguous(memory_format=cl)[:, :, 1:H + 1]
    elif layout == "wslice":  # W slice of channels_last: rows not merged if H == 1, else a kernel_layout copy
        t = base(N, C, H, W + 3).contiguous(memory_format=cl)[:, :, :, 3:]
    elif layout == "hslice_nchw":  # H and W do not merge: kernel_layout copy
        t = base(N, C, 2 * H, W)[:, :, ::2]
    elif layout == "permuted":  # neither NCHW nor channels_last: kernel_layout copy
        t = base(N, W, H, C).permute(0, 3, 2, 1)
    elif layout == "expanded":  # all strides 0
        t = base(1, 1, 1, 1).expand(N, C, H, W)
    elif layout == "expanded_c":  # stride 0 except along C
        t = base(1, C, 1, 1).expand(N, C, H, W)
    else:
        raise ValueError(layout)
    assert t.shape == (N, C, H, W), (layout, t.shape)
    return t


def channel_params(C, dtype):
    """weight in [0.5, 1.5] (bf16 for bf16 x: converted by the bindings), bias in [-0.5, 0.5] (fp32)."""
    w_dt = {torch.float64: torch.float64, torch.bfloat16: torch.bfloat16}.get(dtype, torch.float32)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(w_dt)
    b = (torch.rand(C, dtype=torch.float64) - 0.5).to(torch.float32)
    return w, b


def vec_of(kernel_name: str) -> int:
    """VEC template argument of a bn_* kernel name from the launch log (third argument)."""
    args = kernel_name[kernel_name.index("<") + 1:-1].split(",")
    return int(args[2])


# ---------------------------------------------------------------------------------------------------------
# The emulator and the source rewrite themselves

SELFTESTS = {
    # name: (expected error, check of the values)
    "tree_sum": ("cudaSuccess", lambda v: v == [32640.0] * 3),
    "missing_barrier": ("cudaSuccess", lambda v: v[0] > 0),  # poisoned reads of unwritten shared memory
    "divergent_barrier": ("cudaErrorIllegalInstruction", None),
    "misaligned": ("cudaErrorMisalignedAddress", None),
    "smem_overflow": ("cudaErrorIllegalAddress", None),
    "launch_bounds": ("cudaErrorInvalidConfiguration", None),
    "grid_y": ("cudaErrorInvalidConfiguration", None),
    "block_size": ("cudaErrorInvalidConfiguration", None),
    "smem_size": ("cudaErrorInvalidValue", None),
    "empty_grid": ("cudaErrorInvalidConfiguration", None),
}


def test_emulator_detects_what_it_claims(emu):
    """Deliberately broken kernels (emulator.h self-tests): the checks the comparisons rely on work."""
    _fresh(emu)
    failures = Failures()
    for schedule in ("forward", "reverse"):
        emu.set_schedule(schedule)
        for name, (expected, check) in SELFTESTS.items():
            if name == "smem_overflow" and emu.asan:
                continue  # under ASan the out-of-bounds shared-memory write aborts the process (by design)
            err, message, values = emu.selftest(name)
            failures.add(f"selftest {name} ({schedule})",
                         None if err == expected else f"got {err} ({message}), expected {expected}")
            if check is not None and err == "cudaSuccess":
                failures.add(f"selftest {name} ({schedule}) values", None if check(values) else f"values {values}")
    failures.assert_none()


def test_every_op_is_emulated_and_tested(emu):
    gen = emu.generated
    assert not TESTED_OPS & set(NOT_EMULATED)
    assert set(gen.schema_ops) == TESTED_OPS | set(NOT_EMULATED), (
        f"csrc/ops.cpp defines {sorted(gen.schema_ops)}; this module tests {sorted(TESTED_OPS)} and names "
        f"{sorted(NOT_EMULATED)} as not emulated: add tests for new ops here, or name them in NOT_EMULATED")
    assert set(gen.cuda_impl_ops) == TESTED_OPS, (
        f"emulated CUDA implementations {sorted(gen.cuda_impl_ops)}, tested ops {sorted(TESTED_OPS)}")
    for op in NOT_EMULATED:  # the emulated build copies the schema but has no kernel for it
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"{emu_build.EMU_NAMESPACE}::{op}", "CPU"), (
            f"{op} is named not emulated but has an emulated kernel")
    for pattern, minimum in emu_build.MIN_MATCHES.items():
        assert gen.counts[pattern] >= minimum, (pattern, gen.counts)
    for op in TESTED_OPS:
        assert hasattr(emu.ops, op)


# (mutation of a copy of csrc/cuda, fragment of the expected error)
REWRITE_GUARDS = [
    ("batch_norm_launch.cu", "<<<", "<< <", "kernel launch `<<<...>>>`"),
    ("batch_norm_cuda_ops.cpp", "TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m)",
     "TORCH_LIBRARY_IMPL(fused_resnet_C, CompositeExplicitAutograd, m)", "TORCH_LIBRARY_IMPL"),
    ("batch_norm_cuda_ops.cpp", "t.is_cuda()", "t.device().type() == c10::DeviceType::CUDA",
     "`.is_cuda()` device check"),
    ("batch_norm_kernels.cuh", "__shared__ S buf[kPartialsTY][kPartialsTX];",
     "__shared__ S buf[kPartialsTY][kPartialsTX], other[1];", "`__shared__` declaration"),
    ("batch_norm_kernels.cuh", "extern __shared__ __align__(16) unsigned char fr_dyn_smem[];",
     "extern __shared__ __align__(16) unsigned char fr_dyn_smem[], fr_other[];", "`__shared__` declaration"),
    ("batch_norm_kernels.cuh", "__syncthreads();", "__syncwarp();", "__syncwarp"),
    ("batch_norm_kernels.cuh", "acc += src[p * stride];", "atomicAdd(&acc, src[p * stride]);", "atomics"),
    ("batch_norm_launch.cu", "cudaError_t err = cudaGetLastError();",
     "cudaError_t err = cudaMemsetAsync(stats, 0, 8, stream);", "cudaMemsetAsync"),
    ("batch_norm_cuda_ops.cpp", "#include <c10/cuda/CUDAStream.h>",
     "#include <c10/cuda/CUDAStream.h>\n#include <ATen/cuda/CUDAContext.h>", "ATen/cuda/CUDAContext.h"),
    ("batch_norm_kernels.cuh", "__global__ void __launch_bounds__(kBlockThreads)\n    bn_act_kernel(",
     "__global__ inline void __launch_bounds__(kBlockThreads)\n    bn_act_kernel(", "`__global__` kernel"),
]


def test_source_rewrite_fails_loudly_on_unexpected_sources(tmp_path):
    """Each guard of build.py trips on a source it does not understand (no compile: generation only)."""
    failures = Failures()
    for i, (fname, old, new, expected) in enumerate(REWRITE_GUARDS):
        src = tmp_path / f"cuda_{i}"
        shutil.copytree(emu_build.CUDA_SRC, src)
        path = src / fname
        text = path.read_text()
        assert old in text, f"guard test {i}: {old!r} no longer in csrc/cuda/{fname}; update REWRITE_GUARDS"
        path.write_text(text.replace(old, new))
        try:
            emu_build.generate_sources(str(tmp_path / f"out_{i}"), cuda_src=str(src))
        except emu_build.SourceTransformError as e:
            failures.add(f"mutation {i} ({fname}: {new!r})", None if expected in str(e) else f"unexpected message: {e}")
        else:
            failures.add(f"mutation {i} ({fname}: {new!r})", "generate_sources accepted it")
    # And the unmodified sources generate.
    gen = emu_build.generate_sources(str(tmp_path / "out_ok"))
    failures.add("unmodified sources", None if gen.sources else "no sources")
    failures.assert_none()


# ---------------------------------------------------------------------------------------------------------
# All five ops over layouts x dtypes

# (layout of x, shape): channel counts chosen so every vector width 8/4/2/1 is used for the 16-bit dtypes.
LAYOUT_CASES = [
    ("nchw", (3, 16, 7, 9)),
    ("channels_last", (3, 16, 7, 9)),
    ("channels_last", (3, 12, 5, 6)),     # C % 8 != 0: VEC 4 (16-bit), 4 (fp32), 2 (fp64)
    ("channels_last", (2, 6, 7, 5)),      # VEC 2
    ("channels_last", (2, 3, 9, 7)),      # VEC 1, TX = 4
    ("cl_cslice_misaligned", (3, 16, 7, 9)),
    ("cl_cslice_aligned", (3, 16, 7, 9)),
    ("cl_cslice_offset", (3, 16, 5, 5)),  # strides allow vectors, the base pointer does not
    ("nchw_cslice", (2, 5, 11, 13)),
    ("nslice", (3, 16, 7, 9)),
    ("hslice_cl", (3, 16, 7, 9)),
    ("wslice", (5, 16, 1, 13)),           # W slice, H == 1: rows not merged
    ("wslice", (2, 8, 3, 5)),             # W slice, H > 1: copy path
    ("hslice_nchw", (2, 8, 3, 5)),        # copy path
    ("permuted", (2, 8, 5, 7)),           # copy path
    ("nchw", (5, 40, 1, 1)),              # 1x1 spatial: NCHW is channels-fastest (s_c == 1)
    ("channels_last", (1, 24, 5, 7)),     # N == 1
]


def _other_layout(layout):
    return "nchw" if layout != "nchw" else "channels_last"


def test_all_ops_layouts_dtypes(emu):
    """Every op and optional-argument variant over layouts x dtypes; residual / grad_out / out also in a
    different layout than x (the launcher's vector width must then fit every tensor)."""
    _fresh(emu, sm_count=4)
    E = emu.ops
    failures = Failures()
    vecs = {dt: set() for dt in DTYPES}
    block_shapes = set()
    for layout, shape in LAYOUT_CASES:
        for dt in DTYPES:
            case = f"{layout} {tuple(shape)} {dt}"
            C = shape[1]
            acc = acc_of(dt)
            rtol = rtol_of(dt)
            x = make(shape, dt, layout, mean=0.5)
            # bn_stats
            s_r = R.bn_stats(x)
            emu.take_launch_log()
            s_e = E.bn_stats(x)
            log = emu.take_launch_log()
            failures.add(f"bn_stats {case}", diff_sums(s_e, s_r, stats_magnitude(x), rtol))
            for kernel, grid, block, smem, err, msg in log:
                if "bn_stats_partial_kernel" in kernel:
                    vecs[dt].add(vec_of(kernel))
                    block_shapes.add(block[:2])
            mean, invstd = R.bn_finalize(s_r, None, None, None, 0.1, 1e-5, acc)
            w, b = channel_params(C, dt)
            # bn_act
            res_same, res_other = make(shape, dt, layout), make(shape, dt, _other_layout(layout))
            for relu, use_w, use_b, res, tag in [(True, True, True, res_same, "res=same"),
                                                 (False, False, False, None, "res=None"),
                                                 (True, True, False, res_other, "res=other")]:
                args = (x, mean, invstd, w if use_w else None, b if use_b else None, res, relu)
                failures.add(f"bn_act relu={relu} weight={use_w} bias={use_b} {tag} {case}",
                             diff_exact(E.bn_act(*args), R.bn_act(*args)))
            y = R.bn_act(x, mean, invstd, w, b, res_same, True)
            # bn_backward_reduce / bn_backward_elemt
            go_same, go_other = make(shape, dt, layout), make(shape, dt, _other_layout(layout))
            count = s_r[0].clone()
            for relu, use_w, out, go, tag in [(True, True, None, go_same, "out=None go=same"),
                                              (True, True, y, go_other, "out=y go=other"),
                                              (False, False, None, go_same, "out=None go=same")]:
                a = (go, x, mean, invstd, w if use_w else None, b if use_w else None, out)
                sums_r = R.bn_backward_reduce(*a, relu)
                failures.add(f"bn_backward_reduce relu={relu} weight={use_w} {tag} {case}",
                             diff_sums(E.bn_backward_reduce(*a, relu), sums_r,
                                       reduce_magnitude(go, x, mean, invstd), rtol))
                for batch, need_dz in [(True, True), (False, False), (True, False), (False, True)]:
                    ea = a + ((sums_r, count) if batch else (None, None)) + (relu, need_dz)
                    (dx_e, dz_e), (dx_r, dz_r) = E.bn_backward_elemt(*ea), R.bn_backward_elemt(*ea)
                    name = f"bn_backward_elemt relu={relu} weight={use_w} sums={batch} need_dz={need_dz} {tag} {case}"
                    failures.add(name + " dx", diff_exact(dx_e, dx_r))
                    failures.add(name + " dz", diff_exact(dz_e, dz_r))
            log += emu.take_launch_log()
            bad = [(k, blk) for k, g, blk, *_ in log if blk[0] * blk[1] * blk[2] != BLOCK_THREADS]
            failures.add(f"block size {case}", f"launches with != {BLOCK_THREADS} threads: {bad}" if bad else None)
    failures.assert_none()
    # The sweep really took every vector width and both block orientations.
    for dt in DTYPES:
        widths = {1 << i for i in range((16 // torch.empty((), dtype=dt).element_size()).bit_length())}
        assert vecs[dt] == widths, f"{dt}: bn_stats vector widths used {sorted(vecs[dt])}, expected {sorted(widths)}"
    assert (1, BLOCK_THREADS) in block_shapes and any(tx > 1 for tx, _ in block_shapes), (
        f"bn_stats block shapes used: {sorted(block_shapes)}; expected rows-fastest (1, {BLOCK_THREADS}) and "
        "channels-fastest ones")


def test_expanded_inputs(emu):
    """Stride-0 inputs: all strides 0 (s_c == s_hw == 0) and stride 0 except along C."""
    _fresh(emu)
    E = emu.ops
    failures = Failures()
    shape = (3, 16, 4, 4)
    for dt in DTYPES:
        acc = acc_of(dt)
        for layout in ("expanded", "expanded_c"):
            case = f"{layout} {dt}"
            x = make(shape, dt, layout, mean=0.5)
            failures.add(f"bn_stats {case}", diff_sums(E.bn_stats(x), R.bn_stats(x), stats_magnitude(x), rtol_of(dt)))
            xr = make(shape, dt, "channels_last", mean=0.5)
            s = R.bn_stats(xr)
            mean, invstd = R.bn_finalize(s, None, None, None, 0.1, 1e-5, acc)
            failures.add(f"bn_act x {case}", diff_exact(E.bn_act(x, mean, invstd, None, None, x, True),
                                                          R.bn_act(x, mean, invstd, None, None, x, True)))
            go = make(shape, dt, layout)
            a = (go, xr, mean, invstd, None, None, None, True)
            sums = R.bn_backward_reduce(*a)
            failures.add(f"bn_backward_reduce grad_out {case}",
                         diff_sums(E.bn_backward_reduce(*a), sums, reduce_magnitude(go, xr, mean, invstd), rtol_of(dt)))
            ea = a[:-1] + (sums, s[0].clone(), True, True)
            for i, (u, v) in enumerate(zip(E.bn_backward_elemt(*ea), R.bn_backward_elemt(*ea))):
                failures.add(f"bn_backward_elemt grad_out {case} output {i}", diff_exact(u, v))
    failures.assert_none()


# ---------------------------------------------------------------------------------------------------------
# Several partial blocks per channel, several channel blocks, grid-stride loops, schedule independence

# (shape, layout, dtype, emulated SM count, expect P > 1 row chunks in the reductions)
PARTIAL_CASES = [
    ((8, 64, 16, 16), "channels_last", torch.bfloat16, 2, True),   # VEC 8, TX 8 x TY 32, P 4
    ((8, 64, 16, 16), "channels_last", torch.float32, 1, True),    # 1 SM: small grids, grid-stride loops
    ((8, 128, 8, 8), "channels_last", torch.float16, 3, True),     # TX 16
    ((4, 128, 8, 8), "channels_last", torch.float32, 3, True),     # TX 32 x TY 8
    ((8, 4, 32, 32), "nchw", torch.float32, 8, True),              # rows-fastest, P 2
    ((6, 5, 30, 30), "nchw_cslice", torch.float64, 16, True),
    ((5, 40, 9, 10), "cl_cslice_misaligned", torch.bfloat16, 4, True),
    ((10, 520, 4, 4), "channels_last", torch.bfloat16, 64, True),  # C > 256: 3 channel blocks, tail
    ((6, 300, 3, 3), "channels_last", torch.float32, 64, False),   # C % 8 != 0, 3 channel blocks
    ((4, 33, 20, 20), "permuted", torch.float32, 8, False),        # copy path, 33 channel blocks
    # P 80 > 64: merge_stats_partials_kernel's threads each merge more than one batch of 8 partials
    ((40, 8, 64, 64), "channels_last", torch.float32, 64, True),
]


def test_multiple_partials_and_grid_stride(emu):
    """Reductions with several row chunks per channel (partials + merge_stats_partials_kernel for the statistics,
    reduce_partials_kernel for the backward), several channel
    blocks and tails, elementwise grid-stride loops; the reductions give bitwise identical results with the
    threads of each block run forward and in reverse (deterministic, no missing barrier)."""
    E = emu.ops
    failures = Failures()
    for shape, layout, dt, sms, expect_partials in PARTIAL_CASES:
        _fresh(emu, sm_count=sms, schedule="forward")
        case = f"{tuple(shape)} {layout} {dt} sms={sms}"
        C = shape[1]
        acc = acc_of(dt)
        x = make(shape, dt, layout, mean=3.0, std=2.0)
        s_r = R.bn_stats(x)
        s_fwd = E.bn_stats(x)
        log = emu.take_launch_log()
        emu.set_schedule("reverse")
        s_rev = E.bn_stats(x)
        failures.add(f"bn_stats {case}", diff_sums(s_fwd, s_r, stats_magnitude(x), rtol_of(dt)))
        failures.add(f"bn_stats forward vs reverse schedule {case}",
                     None if torch.equal(s_fwd, s_rev) else f"{s_fwd} != {s_rev}")
        partial_grids = [g for k, g, *_ in log if "bn_stats_partial_kernel" in k]
        got_partials = (bool(partial_grids) and partial_grids[0][1] > 1
                        and any("merge_stats_partials" in k for k, *_ in log))
        failures.add(f"bn_stats partials {case}", None if got_partials == expect_partials else
                     f"expected {'several' if expect_partials else 'one'} row chunk(s), launches: {log}")

        mean, invstd = R.bn_finalize(s_r, None, None, None, 0.1, 1e-5, acc)
        w, b = channel_params(C, dt)
        res = make(shape, dt, "channels_last")
        emu.take_launch_log()
        args = (x, mean, invstd, w, b, res, True)
        failures.add(f"bn_act {case}", diff_exact(E.bn_act(*args), R.bn_act(*args)))
        y = R.bn_act(*args)
        go = make(shape, dt, layout)
        for out in (None, y):
            a = (go, x, mean, invstd, w, b, out, True)
            emu.set_schedule("forward")
            r_fwd = E.bn_backward_reduce(*a)
            emu.set_schedule("reverse")
            r_rev = E.bn_backward_reduce(*a)
            sums = R.bn_backward_reduce(*a)
            tag = f"out={'y' if out is not None else None} {case}"
            failures.add(f"bn_backward_reduce {tag}",
                         diff_sums(r_fwd, sums, reduce_magnitude(go, x, mean, invstd), rtol_of(dt)))
            failures.add(f"bn_backward_reduce forward vs reverse schedule {tag}",
                         None if torch.equal(r_fwd, r_rev) else f"{r_fwd} != {r_rev}")
            ea = a[:-1] + (sums, s_r[0].clone(), True, True)
            for i, (u, v) in enumerate(zip(E.bn_backward_elemt(*ea), R.bn_backward_elemt(*ea))):
                failures.add(f"bn_backward_elemt output {i} {tag}", diff_exact(u, v))
        if sms == 1:  # the elementwise kernels looped: fewer rows per grid step than rows
            M = shape[0] * shape[2] * shape[3]
            act = [(g, blk) for k, g, blk, *_ in emu.take_launch_log() if "bn_act_kernel" in k]
            failures.add(f"grid-stride {case}", None if act and act[0][0][1] * act[0][1][1] < M else
                         f"bn_act covered all {M} rows in one grid step: {act}")
    failures.assert_none()


# ---------------------------------------------------------------------------------------------------------
# Breadth: seeded random configurations

RANDOM_LAYOUTS = ["nchw", "channels_last", "cl_cslice_misaligned", "cl_cslice_aligned", "cl_cslice_offset",
                  "nchw_cslice", "nslice", "hslice_cl", "wslice", "hslice_nchw", "permuted", "expanded_c"]


def test_random_configurations(emu):
    """Seeded random shapes (C up to 264, odd sizes, N or HW == 1), layouts of x / residual / grad_out,
    dtypes, SM counts, schedules and optional arguments: every op of a training step."""
    import random
    rng = random.Random(1234)
    E = emu.ops
    failures = Failures()
    n_cases = 0
    while n_cases < 250:
        shape = (rng.choice([1, 2, 3, 5, 8]), rng.choice([1, 2, 3, 7, 8, 16, 24, 33, 64, 100, 129, 264]),
                 rng.choice([1, 2, 5, 8, 13]), rng.choice([1, 3, 7, 16]))
        M = shape[0] * shape[2] * shape[3]
        if M * shape[1] > 40000 or M > 4096:  # fp32 sums of the CPU twin stay within rtol 1e-5
            continue
        n_cases += 1
        dt = rng.choice(DTYPES)
        lx, lr, lg = rng.choice(RANDOM_LAYOUTS), rng.choice(RANDOM_LAYOUTS + ["expanded"]), rng.choice(RANDOM_LAYOUTS[:-1])
        sms = rng.choice([1, 2, 3, 7, 16, 132])
        _fresh(emu, sm_count=sms, schedule=rng.choice(["forward", "reverse", "alternate"]))
        case = f"{shape} x={lx} residual={lr} grad_out={lg} {dt} sms={sms}"
        x = make(shape, dt, lx, mean=rng.choice([0.0, 3.0, 100.0]), std=rng.choice([1.0, 0.05]))
        s_r = R.bn_stats(x)
        failures.add(f"bn_stats {case}", diff_sums(E.bn_stats(x), s_r, stats_magnitude(x), rtol_of(dt)))
        mean, invstd = R.bn_finalize(s_r, None, None, None, 0.1, 1e-5, acc_of(dt))
        w, b = channel_params(shape[1], dt)
        w, b = (w if rng.random() < 0.7 else None), (b if rng.random() < 0.7 else None)
        res = make(shape, dt, lr) if rng.random() < 0.5 else None
        relu = rng.random() < 0.7
        args = (x, mean, invstd, w, b, res, relu)
        failures.add(f"bn_act relu={relu} residual={res is not None} {case}", diff_exact(E.bn_act(*args), R.bn_act(*args)))
        go = make(shape, dt, lg)
        out = R.bn_act(*args) if rng.random() < 0.5 else None
        a = (go, x, mean, invstd, w, b, out, relu)
        sums = R.bn_backward_reduce(*a)
        failures.add(f"bn_backward_reduce out={out is not None} {case}",
                     diff_sums(E.bn_backward_reduce(*a), sums, reduce_magnitude(go, x, mean, invstd), rtol_of(dt)))
        batch, need_dz = rng.random() < 0.6, rng.random() < 0.5
        ea = a[:-1] + ((sums, s_r[0].clone()) if batch else (None, None)) + (relu, need_dz)
        for i, (u, v) in enumerate(zip(E.bn_backward_elemt(*ea), R.bn_backward_elemt(*ea))):
            failures.add(f"bn_backward_elemt output {i} sums={batch} need_dz={need_dz} {case}", diff_exact(u, v))
    failures.assert_none()


# ---------------------------------------------------------------------------------------------------------
# bn_finalize

def test_finalize(emu):
    """Mean/invstd in fp32/fp64/fp16; running buffers fp32/fp64 (updated in place by the kernel) and
    fp16/bf16/strided (fp64 copies written back); momentum or cumulative average (num_batches_tracked)."""
    _fresh(emu)
    E = emu.ops
    failures = Failures()
    for C in (1, 5, 300):  # 300: two blocks, the second partly idle
        x = torch.randn(4, C, 3, 3, dtype=torch.float64) * 2 + 3
        s = R.bn_stats(x)
        for rdt in (torch.float32, torch.float64, torch.float16, torch.bfloat16, None):
            for momentum in (0.1, None):
                for odt in (torch.float32, torch.float64, torch.float16):
                    nbt = torch.tensor(7, dtype=torch.long if odt != torch.float16 else torch.int32)
                    rm_r = rv_r = rm_e = rv_e = None
                    if rdt is not None:
                        rm_r, rv_r = torch.randn(C).to(rdt), (torch.rand(C) + 0.5).to(rdt)
                        rm_e, rv_e = rm_r.clone(), rv_r.clone()
                    oe = E.bn_finalize(s, rm_e, rv_e, nbt, momentum, 1e-5, odt)
                    orr = R.bn_finalize(s, rm_r, rv_r, nbt, momentum, 1e-5, odt)
                    case = f"C={C} running={rdt} momentum={momentum} dtype={odt}"
                    failures.add(f"bn_finalize mean {case}", diff_exact(oe[0], orr[0]))
                    failures.add(f"bn_finalize invstd {case}", diff_exact(oe[1], orr[1]))
                    if rdt is not None:
                        failures.add(f"bn_finalize running_mean {case}", diff_exact(rm_e, rm_r))
                        failures.add(f"bn_finalize running_var {case}", diff_exact(rv_e, rv_r))
        # Strided fp32 running_mean with a contiguous fp64 running_var (mixed: the copy path).
        base_r, base_e = torch.randn(2 * C), None
        base_e = base_r.clone()
        rm_r, rm_e = base_r[::2], base_e[::2]
        rv_r = (torch.rand(C) + 0.5).double()
        rv_e = rv_r.clone()
        oe = E.bn_finalize(s, rm_e, rv_e, None, 0.3, 1e-3, torch.float32)
        orr = R.bn_finalize(s, rm_r, rv_r, None, 0.3, 1e-3, torch.float32)
        case = f"C={C} strided running_mean"
        failures.add(f"bn_finalize {case} mean", diff_exact(oe[0], orr[0]))
        failures.add(f"bn_finalize {case} invstd", diff_exact(oe[1], orr[1]))
        failures.add(f"bn_finalize {case} running_mean storage", diff_exact(base_e, base_r))
        failures.add(f"bn_finalize {case} running_var", diff_exact(rv_e, rv_r))
    failures.assert_none()


def test_prologue_half(emu):
    """The CUTLASS prologue vectors' kernel (one block, strided channels, a shared-memory amax tree) against
    the CPU twin, bitwise: C below, at and above the block size, alpha 1 and > 1, NaN and inf statistics,
    weight / bias absent or fp16."""
    _fresh(emu)
    E = emu.ops
    failures = Failures()
    g = torch.Generator().manual_seed(11)
    for C in (1, 5, 255, 256, 300, 2048, 2049):
        for case in ("plain", "large", "nan", "inf", "no_affine", "half_affine"):
            mean, invstd = torch.randn(C, generator=g) * 3, torch.rand(C, generator=g) + 0.5
            weight, bias = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
            c = C // 2
            if case == "large":
                mean[c], invstd[c] = 300.0, 316.2
            elif case == "nan":
                invstd[c] = float("nan")
            elif case == "inf":
                mean[c] = float("inf")
            elif case == "no_affine":
                weight = bias = None
            elif case == "half_affine":
                weight, bias = weight.half(), bias.half()
            got = E.bn_prologue_half(mean, invstd, weight, bias)
            want = R.bn_prologue_half(mean, invstd, weight, bias)
            for name, u, v in zip(("scale", "shift", "alpha"), got, want):
                failures.add(f"bn_prologue_half {name} C={C} {case}", diff_exact(u, v))
            if case == "large":
                failures.add(f"bn_prologue_half alpha C={C} large",
                             None if want[2].item() > 1 else f"alpha {want[2].item()} (expected > 1)")
    log = emu.take_launch_log()
    failures.add("launches", None if log else "no kernel launched")
    failures.assert_none()


# ---------------------------------------------------------------------------------------------------------
# Edge cases

def test_empty_tensors_launch_nothing(emu):
    _fresh(emu)
    E = emu.ops
    failures = Failures()
    for shape in ((0, 8, 3, 3), (2, 0, 3, 3), (2, 8, 0, 3)):
        for dt in (torch.float32, torch.bfloat16):
            case = f"{shape} {dt}"
            x = torch.randn(shape).to(dt)
            C = shape[1]
            mean, invstd = torch.zeros(C), torch.ones(C)
            failures.add(f"bn_stats {case}", diff_exact(E.bn_stats(x), R.bn_stats(x)))
            args = (x, mean, invstd, None, None, x, True)
            failures.add(f"bn_act {case}", diff_exact(E.bn_act(*args), R.bn_act(*args)))
            a = (x, x, mean, invstd, None, None, None)
            failures.add(f"bn_backward_reduce {case}",
                         diff_exact(E.bn_backward_reduce(*a, True), R.bn_backward_reduce(*a, True)))
            for need_dz in (True, False):
                ea = a + (None, None, True, need_dz)
                for i, (u, v) in enumerate(zip(E.bn_backward_elemt(*ea), R.bn_backward_elemt(*ea))):
                    failures.add(f"bn_backward_elemt need_dz={need_dz} output {i} {case}", diff_exact(u, v))
    log = emu.take_launch_log()
    failures.add("launches", f"kernels launched for empty tensors: {log}" if log else None)  # an empty grid is
    # an invalid configuration on a GPU; the bindings must return early
    failures.assert_none()


def test_nan_propagates_like_the_cpu_twin(emu):
    _fresh(emu)
    E = emu.ops
    failures = Failures()
    for dt in DTYPES:
        x = make((2, 16, 3, 5), dt, "channels_last")
        x[1, 3, 2, 4] = float("nan")
        s_e, s_r = E.bn_stats(x), R.bn_stats(x)
        failures.add(f"bn_stats NaN channel {dt}", None if torch.equal(s_e.isnan(), s_r.isnan()) and
                     bool(s_e[1:, 3].isnan().all()) else f"{s_e[:, 3]} vs {s_r[:, 3]}")
        xf = make((2, 16, 3, 5), dt, "channels_last")
        mean, invstd = R.bn_finalize(R.bn_stats(xf), None, None, None, 0.1, 1e-5, acc_of(dt))
        failures.add(f"bn_act NaN {dt}", diff_exact(E.bn_act(x, mean, invstd, None, None, None, True),
                                                    R.bn_act(x, mean, invstd, None, None, None, True)))
    failures.assert_none()


def test_stats_stability_large_mean(emu):
    """fp32 data with mean 1e4 and std 1: the variance from the emulated kernels (several row chunks;
    rows-fastest too) within 1e-5 relative of float64's."""
    E = emu.ops
    failures = Failures()
    xd = torch.randn(16, 32, 20, 20, dtype=torch.float64) + 1e4
    for layout in ("channels_last", "nchw"):
        _fresh(emu, sm_count=8)
        x = xd.float()
        x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        stats = E.bn_stats(x)
        mean, invstd = E.bn_finalize(stats, None, None, None, 0.1, 0.0, torch.float64)
        ref = x.double()
        var_ref = ref.var(dim=(0, 2, 3), unbiased=False)
        var_rel = ((1 / invstd ** 2 - var_ref).abs() / var_ref).max().item()
        mean_err = (mean - ref.mean(dim=(0, 2, 3))).abs().max().item()
        failures.add(f"variance {layout}", None if var_rel <= 1e-5 else f"relative error {var_rel:.2e} > 1e-5")
        failures.add(f"mean {layout}", None if mean_err <= 1e-3 else f"absolute error {mean_err:.2e}")
    failures.assert_none()


def test_argument_errors_match_the_cpu_twin(emu):
    """The bindings' checks reject what the CPU twin rejects."""
    _fresh(emu)
    E = emu.ops
    x = make((2, 4, 3, 3), torch.float32, "channels_last")
    m, i = torch.zeros(4), torch.ones(4)
    s = R.bn_stats(x)
    cases = {
        "x not 4-D": ("bn_stats", (x[0],)),
        "integer x": ("bn_stats", (x.to(torch.int32),)),
        "mean of the wrong dtype": ("bn_act", (x, m.double(), i, None, None, None, True)),
        "mean of the wrong length": ("bn_act", (x, torch.zeros(5), i, None, None, None, True)),
        "residual of another shape": ("bn_act", (x, m, i, None, None, x[:1], True)),
        "grad_out of another dtype": ("bn_backward_reduce", (x.double(), x, m, i, None, None, None, True)),
        "sums without count": ("bn_backward_elemt", (x, x, m, i, None, None, None, torch.zeros(2, 4), None, True, False)),
        "running_mean without running_var": ("bn_finalize", (s, torch.zeros(4), None, None, 0.1, 1e-5, torch.float32)),
        "momentum None without num_batches_tracked": ("bn_finalize", (s, torch.zeros(4), torch.ones(4), None, None,
                                                                       1e-5, torch.float32)),
        "stats of the wrong shape": ("bn_finalize", (s[:2], None, None, None, 0.1, 1e-5, torch.float32)),
    }
    failures = Failures()
    for name, (op, args) in cases.items():
        outcome = []
        for impl in (E, R):
            try:
                getattr(impl, op)(*args)
                outcome.append("accepted")
            except RuntimeError:
                outcome.append("rejected")
        failures.add(f"{op}: {name}", None if outcome == ["rejected", "rejected"] else
                     f"emulated CUDA {outcome[0]}, CPU twin {outcome[1]}")
    failures.assert_none()
