"""Builds fused_resnet's CUDA sources (csrc/cuda/) as a CPU extension that runs the kernels in an emulator.

    from build import build_emulated_extension
    emu = build_emulated_extension("/tmp/some/dir")      # the Python module of the extension
    torch.ops.fused_resnet_emu.bn_stats(x_cpu)            # the CUDA bindings + launchers + kernels, on CPU
    emu.set_sm_count(8); emu.take_launch_log(); ...       # emulator controls (see emulator.h)

The sources are read from the current checkout every time (nothing is cached across source changes) and
rewritten mechanically into build_dir/src:

  device files (*.cu, *.cuh, headers with device code)
    * `#include "emulator.h"` first (tests/cuda_emulation/emulator.h: execution model, runtime stubs);
    * `kernel<targs><<<cfg>>>(args)`  ->  `::emu::launch<&kernel<targs>>(::emu::LaunchConfig(cfg), args)`;
    * `extern __shared__ T name[];`  ->  a reference to the launch's dynamic shared-memory buffer;
    * `__shared__ T name[d]...;`  ->  a reference to a per-launch static shared buffer;
    * `reinterpret_cast<P*>(e)`  ->  `::emu::checked_cast<P*>(e)` (alignment check), and when immediately
      dereferenced, `*reinterpret_cast<P*>(e)`  ->  `::emu::aligned_ref<P>(e)` (checked, memcpy access);
    * `__global__ ... __launch_bounds__(B[, m]) name(...) {`  ->  `{ ::emu::check_launch_bounds(B);` added;
    * constructs the emulator does not model (warp shuffles, atomics, inline PTX, ...) are rejected.
  host bindings (*.cpp)
    * `c10/cuda/CUDAGuard.h` and `c10/cuda/CUDAStream.h` resolve to stand-ins in build_dir/include (the
      emulated device is the CPU); any other CUDA-only include is rejected;
    * `.is_cuda()` -> `.is_cpu()`;
    * `TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m)` -> `TORCH_LIBRARY_IMPL(fused_resnet_emu, CPU, m)`, and
      the schemas of csrc/ops.cpp's `TORCH_LIBRARY(fused_resnet_C, m)` are defined for `fused_resnet_emu`.
  every file: calls of CUDA runtime functions other than those emulator.h implements are rejected.

The generated files carry `#line` directives, so compile errors point at the original csrc/cuda lines.

Every rewrite checks that it matched what it expects (see MIN_MATCHES and the per-pattern checks) and raises
SourceTransformError naming the pattern otherwise, so a change in csrc/cuda that the rewrite does not
understand fails the build instead of producing a half-emulated extension.

Compiled with torch.utils.cpp_extension.load (host g++, CUDA headers for types and the host versions of the
half/bfloat16 intrinsics; no CUDA runtime library), -O1, FMA contraction off. FUSED_RESNET_EMU_ASAN=1 adds
AddressSanitizer: out-of-bounds global-memory accesses of the kernels are then reported too. Run as

    LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \
    ASAN_OPTIONS=detect_leaks=0 FUSED_RESNET_EMU_ASAN=1 python -m pytest tests/test_cuda_emulated.py -s

(-s: an ASan report ends the process, and pytest's output capture would swallow it; ~1.5 min instead of
~0.5; the shared-memory guard zones are then ASan-poisoned as well). Without ASan, an out-of-bounds
global-memory write of a kernel goes undetected or corrupts the process (a crash rather than a clean
failure): rerun with ASan to locate it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
CUDA_SRC = os.path.join(CSRC, "cuda")
OPS_CPP = os.path.join(CSRC, "ops.cpp")

SOURCE_NAMESPACE = "fused_resnet_C"
EMU_NAMESPACE = "fused_resnet_emu"
EXTENSION_NAME = "fused_resnet_cuda_emu"

# Each rewrite must match at least this many times over csrc/cuda (the current sources use all of them).
# A count of 0 means the sources changed shape: the rewrite (or this table) needs a look.
MIN_MATCHES = {
    "kernel launch `<<<...>>>`": 1,
    "`__global__` kernel": 1,
    "`__launch_bounds__`": 1,
    "`extern __shared__` array": 1,
    "static `__shared__` array": 1,
    "dereferenced pointer `reinterpret_cast` (vector load/store)": 1,
    "`.is_cuda()` device check": 1,
    f"`TORCH_LIBRARY_IMPL({SOURCE_NAMESPACE}, CUDA, ...)` block": 1,
}

# CUDA runtime API functions emulator.h implements.
EMULATED_RUNTIME_API = {"cudaGetLastError", "cudaPeekAtLastError", "cudaGetErrorString", "cudaGetErrorName",
                        "cudaGetDevice", "cudaDeviceGetAttribute"}

# Device-code constructs the emulator does not model: (regex, what).
UNSUPPORTED_DEVICE_CONSTRUCTS = [
    (r"\b__shfl\w*", "warp shuffles"),
    (r"\b__(?:ballot|any|all|match|reduce_\w+)_sync\b", "warp votes / warp reductions"),
    (r"\b__activemask\b", "__activemask"),
    (r"\b__syncwarp\b", "__syncwarp"),
    (r"\b__syncthreads_(?:count|and|or)\b", "__syncthreads_count/and/or"),
    (r"\bwarpSize\b", "warpSize"),
    (r"\bcooperative_groups\b|\bcg::", "cooperative groups"),
    (r"\batomic\w*\s*\(", "atomics"),
    (r"\b__threadfence\w*", "memory fences"),
    (r"\bclock(?:64)?\s*\(|\b__nanosleep\b", "clocks / sleeps"),
    (r"\basm\b|\b__asm__\b", "inline PTX"),
    (r"\b__ldg\b|\b__ldcs\b|\b__ldcg\b|\b__stcs\b|\b__stwt\b", "cache-hinted loads/stores"),
    (r"\b__constant__\b", "__constant__ memory"),
    (r"\btex\w*(?:1D|2D|3D)\w*\s*\(|\bsurf\w*\s*\(", "textures / surfaces"),
    (r"\bcudaLaunch\w*\s*\(", "launches through the runtime API (only <<<>>> is rewritten)"),
]

# Host-side CUDA headers the emulator stands in for (build_dir/include); any other is rejected.
STUB_HEADERS = {
    "c10/cuda/CUDAGuard.h": """\
// Emulator stand-in for c10/cuda/CUDAGuard.h (tests/cuda_emulation/build.py): the emulated GPU is the CPU.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#define FR_EMU_C10_CUDA_STUBS 1
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "emulated CUDAGuard: the emulated CUDA device is the CPU, got ", device);
  }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};
}  // namespace cuda
}  // namespace c10
""",
    "c10/cuda/CUDAStream.h": """\
// Emulator stand-in for c10/cuda/CUDAStream.h (tests/cuda_emulation/build.py): one (null) stream; the
// emulator runs every launch synchronously.
#pragma once
#include <c10/core/Device.h>
#include <cuda_runtime_api.h>
#define FR_EMU_C10_CUDA_STUBS 1
namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
""",
}

RUNTIME_TU = """\
// Generated by tests/cuda_emulation/build.py: the emulator's runtime (CUDA API stubs, Python module).
#define FR_EMU_RUNTIME 1
#include "emulator.h"
"""


class SourceTransformError(RuntimeError):
    """A rewrite of csrc/cuda did not match what it expects: the emulator build needs updating."""


class CudaHeadersMissing(RuntimeError):
    """No CUDA toolkit headers: the emulated build cannot be compiled on this machine."""


def _fail(path: str, pattern: str, detail: str) -> None:
    raise SourceTransformError(
        f"CUDA emulation: {os.path.relpath(path, ROOT) if os.path.isabs(path) else path}: {pattern}: {detail}. "
        "The source transformation in tests/cuda_emulation/build.py needs updating for the current csrc/cuda "
        "sources (refusing to build a partially emulated extension).")


# ---------------------------------------------------------------------------------------------------------
# CUDA toolkit

def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root with include/cuda_runtime_api.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime_api.h")):
            return c
    return None


def cuda_headers_missing_reason() -> Optional[str]:
    home = find_cuda_home()
    if home is None:
        return ("CUDA toolkit headers not found (no include/cuda_runtime_api.h under $CUDA_HOME, $CUDA_PATH, "
                "/usr/local/cuda or nvcc's prefix)")
    for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        if not os.path.isfile(os.path.join(home, "include", h)):
            return f"CUDA toolkit at {home} lacks include/{h}"
    return None


# ---------------------------------------------------------------------------------------------------------
# Text helpers. Patterns are searched in a "code view" of each file (comments and string/char literals
# blanked, same length), so that comments mentioning e.g. __shared__ neither match nor count.

def code_view(text: str) -> str:
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if text[k] != "\n":
                    out[k] = " "
            i = j
        elif c in "\"'":
            if c == "'" and i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_"):  # digit separator 1'000
                i += 1
                continue
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                if text[k] != "\n":
                    out[k] = " "
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _match_forward(code: str, i: int, open_c: str, close_c: str) -> int:
    """code[i] == open_c; index of the matching close_c."""
    depth = 0
    for j in range(i, len(code)):
        if code[j] == open_c:
            depth += 1
        elif code[j] == close_c:
            depth -= 1
            if depth == 0:
                return j
    return -1


def _match_backward(code: str, i: int, open_c: str, close_c: str) -> int:
    """code[i] == close_c; index of the matching open_c."""
    depth = 0
    for j in range(i, -1, -1):
        if code[j] == close_c:
            depth += 1
        elif code[j] == open_c:
            depth -= 1
            if depth == 0:
                return j
    return -1


def _skip_ws(code: str, i: int) -> int:
    while i < len(code) and code[i].isspace():
        i += 1
    return i


def _skip_ws_back(code: str, i: int) -> int:
    while i >= 0 and code[i].isspace():
        i -= 1
    return i


def _apply(text: str, edits: List[Tuple[int, int, str]]) -> str:
    for start, end, repl in sorted(edits, key=lambda e: e[0], reverse=True):
        text = text[:start] + repl + text[end:]
    return text


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


# ---------------------------------------------------------------------------------------------------------
# Device-code rewrites. Each returns the new text and its match count; edits are position-based on the
# code view of the text it receives.

def rewrite_launches(path: str, text: str) -> Tuple[str, int]:
    code = code_view(text)
    edits = []
    for m in re.finditer(r"<<<", code):
        start = m.start()
        close = code.find(">>>", start + 3)
        if close < 0:
            _fail(path, "kernel launch `<<<...>>>`", f"no `>>>` after the `<<<` at line {_line(text, start)}")
        config = text[start + 3:close].strip()
        paren = _skip_ws(code, close + 3)
        if paren >= len(code) or code[paren] != "(":
            _fail(path, "kernel launch `<<<...>>>`", f"`>>>` not followed by `(` at line {_line(text, close)}")
        # The kernel expression before `<<<`: name[::name...][<template args>].
        k_end = _skip_ws_back(code, start - 1)
        k = k_end
        if k >= 0 and code[k] == ">":
            k = _match_backward(code, k, "<", ">")
            if k < 0:
                _fail(path, "kernel launch `<<<...>>>`", f"unbalanced template arguments at line {_line(text, start)}")
            k -= 1
        name_end = k
        while k >= 0 and (code[k].isalnum() or code[k] in "_:"):
            k -= 1
        k_start = k + 1
        if k_start > name_end or not re.match(r"[A-Za-z_:]", code[k_start]):
            _fail(path, "kernel launch `<<<...>>>`", f"cannot find the kernel name before `<<<` at line {_line(text, start)}")
        kernel = re.sub(r"\s+", " ", text[k_start:k_end + 1])
        if not config:
            _fail(path, "kernel launch `<<<...>>>`", f"empty launch configuration at line {_line(text, start)}")
        no_args = code[_skip_ws(code, paren + 1)] == ")"
        repl = f"::emu::launch<&{kernel}>(::emu::LaunchConfig({config})" + ("" if no_args else ", ")
        repl += "\n" * text.count("\n", k_start, paren + 1)  # keep the line numbers of the original
        edits.append((k_start, paren + 1, repl))
    new = _apply(text, edits)
    if "<<<" in code_view(new) or ">>>" in code_view(new):
        _fail(path, "kernel launch `<<<...>>>`", "a `<<<` or `>>>` survived the rewrite")
    return new, len(edits)


def rewrite_shared(path: str, text: str) -> Tuple[str, int, int]:
    """Returns (text, number of extern __shared__ arrays, number of static __shared__ declarations)."""
    code = code_view(text)
    edits = []
    n_extern = n_static = 0
    align = r"(?:__align__\s*\(\s*\w+\s*\)\s*|alignas\s*\(\s*\w+\s*\)\s*)?"
    ext = re.compile(r"extern\s+__shared__\s+" + align + r"(?P<type>[A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)\s+"
                     + align + r"(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;")
    for m in ext.finditer(code):
        t, name = re.sub(r"\s+", " ", m.group("type")), m.group("name")
        repl = (f"static {t}* const& {name} = *reinterpret_cast<{t}* const*>(&::emu::g_dyn_smem);"
                f"  /* emu: was extern __shared__ {t} {name}[] */")
        edits.append((m.start(), m.end(), repl))
        n_extern += 1
    static = re.compile(r"(?<![\w])__shared__\s+" + align + r"(?P<type>[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?"
                        r"(?:\s+[A-Za-z_][\w:]*)*?)\s+" + align + r"(?P<name>[A-Za-z_]\w*)\s*"
                        r"(?P<dims>(?:\[[^\]\[;]+\]\s*)*);")
    taken = [(s, e) for s, e, _ in edits]
    for m in static.finditer(code):
        if any(s <= m.start() < e for s, e in taken):
            continue
        t, name = re.sub(r"\s+", " ", m.group("type")), m.group("name")
        dims = re.sub(r"\s+", "", text[m.start("dims"):m.end("dims")])
        if dims:
            repl = (f"static const char fr_emu_tag_{name} = 0; {t}(&{name}){dims} = "
                    f"*::emu::static_shared<{t}{dims}>(&fr_emu_tag_{name});")
        else:
            repl = (f"static const char fr_emu_tag_{name} = 0; {t}& {name} = "
                    f"*::emu::static_shared<{t}>(&fr_emu_tag_{name});")
        edits.append((m.start(), m.end(), repl))
        n_static += 1
    total = len(re.findall(r"\b__shared__\b", code))
    if total != n_extern + n_static:
        pos = [m.start() for m in re.finditer(r"\b__shared__\b", code)
               if not any(s <= m.start() < e for s, e, _ in edits)]
        _fail(path, "`__shared__` declaration", f"{total - n_extern - n_static} declaration(s) of an unrecognised "
              f"form (line(s) {', '.join(str(_line(text, p)) for p in pos)}); supported: "
              "`extern __shared__ [__align__(n)] T name[];` and `__shared__ T name[d]...;`")
    return _apply(text, edits), n_extern, n_static


def rewrite_reinterpret_casts(path: str, text: str) -> Tuple[str, int, int]:
    """Returns (text, dereferenced pointer casts, other pointer casts)."""
    code = code_view(text)
    edits = []
    n_deref = n_ptr = 0
    for m in re.finditer(r"\breinterpret_cast\s*<", code):
        lt = m.end() - 1
        gt = _match_forward(code, lt, "<", ">")
        if gt < 0:
            _fail(path, "`reinterpret_cast`", f"unbalanced `<>` at line {_line(text, m.start())}")
        target = re.sub(r"\s+", " ", text[lt + 1:gt]).strip()
        if not target.endswith("*"):
            continue  # to an integer (address arithmetic on the host side): nothing to check
        op = _skip_ws(code, gt + 1)
        if op >= len(code) or code[op] != "(":
            _fail(path, "`reinterpret_cast`", f"no `(` after the target type at line {_line(text, m.start())}")
        cp = _match_forward(code, op, "(", ")")
        arg = text[op + 1:cp]
        star = _skip_ws_back(code, m.start() - 1)
        before = _skip_ws_back(code, star - 1)
        is_deref = star >= 0 and code[star] == "*" and (before < 0 or code[before] in "=({};,:?!&|" or
                                                          code[max(0, before - 5):before + 1] == "return")
        if is_deref:
            pointee = target[:-1].strip()
            edits.append((star, cp + 1, f"::emu::aligned_ref<{pointee}>({arg})"))
            n_deref += 1
        else:
            edits.append((m.start(), cp + 1, f"::emu::checked_cast<{target}>({arg})"))
            n_ptr += 1
    return _apply(text, edits), n_deref, n_ptr


def rewrite_kernels(path: str, text: str) -> Tuple[str, int, int]:
    """Inserts `::emu::check_launch_bounds(B);` at the top of every kernel with __launch_bounds__(B, ...).
    Returns (text, kernels, kernels with launch bounds)."""
    code = code_view(text)
    lb = r"(?:__launch_bounds__\s*\((?P<lb{0}>[^()]*)\)\s*)?"
    pat = re.compile(r"\b__global__\s+" + lb.format(1) + r"void\s+" + lb.format(2) + r"(?P<name>[A-Za-z_]\w*)\s*\(")
    edits = []
    n_kernels = n_bounds = 0
    for m in pat.finditer(code):
        n_kernels += 1
        close = _match_forward(code, m.end() - 1, "(", ")")
        brace = _skip_ws(code, close + 1)
        if close < 0 or brace >= len(code) or code[brace] not in "{;":
            _fail(path, "`__global__` kernel", f"cannot find the body of kernel {m.group('name')} "
                  f"(line {_line(text, m.start())})")
        bounds = m.group("lb1") or m.group("lb2")
        if code[brace] == "{" and bounds:
            max_threads = bounds.split(",")[0].strip()
            edits.append((brace + 1, brace + 1, f" ::emu::check_launch_bounds({max_threads});"))
        if bounds:
            n_bounds += 1
    total = len(re.findall(r"\b__global__\b", code))
    if total != n_kernels:
        _fail(path, "`__global__` kernel", f"{total - n_kernels} `__global__` declaration(s) not of the form "
              "`__global__ [__launch_bounds__(...)] void [__launch_bounds__(...)] name(...)`")
    return _apply(text, edits), n_kernels, n_bounds


def check_unsupported(path: str, text: str) -> None:
    code = code_view(text)
    for pattern, what in UNSUPPORTED_DEVICE_CONSTRUCTS:
        m = re.search(pattern, code)
        if m:
            raise SourceTransformError(
                f"CUDA emulation: {os.path.relpath(path, ROOT)}:{_line(text, m.start())}: uses {what} "
                f"(`{m.group(0).strip()}`), which tests/cuda_emulation/emulator.h does not emulate. Extend the "
                "emulator (and this check in build.py) before using it in the kernels.")


def check_runtime_calls(path: str, text: str) -> None:
    code = code_view(text)
    for m in re.finditer(r"\b(cuda[A-Z]\w*)\s*\(", code):
        if m.group(1) not in EMULATED_RUNTIME_API:
            raise SourceTransformError(
                f"CUDA emulation: {os.path.relpath(path, ROOT)}:{_line(text, m.start())}: calls {m.group(1)}, "
                f"which the emulator does not implement (it has {', '.join(sorted(EMULATED_RUNTIME_API))}). "
                "Add it to the runtime section of tests/cuda_emulation/emulator.h and to EMULATED_RUNTIME_API.")


# ---------------------------------------------------------------------------------------------------------
# Host-binding rewrites.

def rewrite_bindings(path: str, text: str) -> Tuple[str, int, int, List[str]]:
    """Returns (text, `.is_cuda()` rewrites, TORCH_LIBRARY_IMPL blocks, implemented op names)."""
    code = code_view(text)
    for m in re.finditer(r'#\s*include\s*[<"]([^>"]+)[>"]', text):
        inc = m.group(1)
        cuda_only = re.match(r"(c10/cuda/|ATen/cuda/|ATen/native/cuda/|cub/|thrust/|cuda/|cublas|cudnn|nccl)", inc)
        if cuda_only and inc not in STUB_HEADERS:
            _fail(path, "CUDA-only include", f"#include <{inc}> (line {_line(text, m.start())}) has no emulator "
                  f"stand-in (stubbed: {', '.join(sorted(STUB_HEADERS))}); add one to STUB_HEADERS")
    edits = [(m.start(), m.end(), ".is_cpu()") for m in re.finditer(r"\.\s*is_cuda\s*\(\s*\)", code)]
    n_is_cuda = len(edits)
    impl = re.compile(r"\bTORCH_LIBRARY_IMPL\s*\(\s*(?P<ns>\w+)\s*,\s*(?P<key>\w+)\s*,\s*(?P<m>\w+)\s*\)")
    n_impl = 0
    names: List[str] = []
    for m in impl.finditer(code):
        if m.group("ns") != SOURCE_NAMESPACE or m.group("key") != "CUDA":
            _fail(path, f"`TORCH_LIBRARY_IMPL({SOURCE_NAMESPACE}, CUDA, ...)` block",
                  f"unexpected registration TORCH_LIBRARY_IMPL({m.group('ns')}, {m.group('key')}, ...)")
        edits.append((m.start(), m.end(), f"TORCH_LIBRARY_IMPL({EMU_NAMESPACE}, CPU, {m.group('m')})"))
        n_impl += 1
        brace = _skip_ws(code, m.end())
        end = _match_forward(code, brace, "{", "}") if brace < len(code) and code[brace] == "{" else -1
        if end < 0:
            _fail(path, f"`TORCH_LIBRARY_IMPL({SOURCE_NAMESPACE}, CUDA, ...)` block", "no `{...}` body")
        names += re.findall(r"\b" + m.group("m") + r'\s*\.\s*impl\s*\(\s*"(\w+)"', text[brace:end])
    if re.search(r"\bTORCH_LIBRARY(?:_FRAGMENT)?\s*\(", code):
        _fail(path, "`TORCH_LIBRARY`", "CUDA bindings define a library themselves; only TORCH_LIBRARY_IMPL "
              "blocks are rewritten")
    return _apply(text, edits), n_is_cuda, n_impl, names


def library_schemas(ops_path: str = OPS_CPP) -> Tuple[str, str, List[str]]:
    """(variable name, body, op names) of csrc/ops.cpp's TORCH_LIBRARY(fused_resnet_C, m) block."""
    with open(ops_path) as f:
        text = f.read()
    code = code_view(text)
    found = list(re.finditer(r"\bTORCH_LIBRARY\s*\(\s*" + SOURCE_NAMESPACE + r"\s*,\s*(\w+)\s*\)\s*\{", code))
    if len(found) != 1:
        _fail(ops_path, f"`TORCH_LIBRARY({SOURCE_NAMESPACE}, m) {{...}}` block", f"found {len(found)}, expected 1")
    m = found[0]
    end = _match_forward(code, m.end() - 1, "{", "}")
    body = text[m.end():end]
    names = re.findall(r"\b" + m.group(1) + r'\s*\.\s*def\s*\(\s*"\s*(\w+)\s*\(', body)
    if not names or len(names) != len(re.findall(r"\b" + m.group(1) + r"\s*\.\s*def\s*\(", code[m.end():end])):
        _fail(ops_path, "operator schemas `m.def(\"name(...) -> ...\")`", "some m.def(...) calls are not a "
              "schema string literal starting with the op name")
    return m.group(1), body, names


# ---------------------------------------------------------------------------------------------------------
# Generation

@dataclasses.dataclass
class GeneratedSources:
    src_dir: str
    include_dir: str
    sources: List[str]            # translation units to compile
    counts: Dict[str, int]        # matches per rewrite
    schema_ops: List[str]         # ops defined by csrc/ops.cpp
    cuda_impl_ops: List[str]      # ops the CUDA bindings implement


DEVICE_MARKERS = re.compile(r"\b__global__\b|\b__device__\b|\b__shared__\b|<<<|\b__syncthreads\b")


def generate_sources(build_dir: str, cuda_src: str = CUDA_SRC, ops_path: str = OPS_CPP) -> GeneratedSources:
    """Writes the rewritten sources to build_dir/src and the stand-in headers to build_dir/include."""
    src_dir = os.path.join(build_dir, "src")
    inc_dir = os.path.join(build_dir, "include")
    written: List[str] = []

    def write(path: str, content: str) -> None:
        # Unchanged files keep their mtime, so rebuilding into the same directory is incremental.
        written.append(os.path.abspath(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.isfile(path):
            with open(path) as f:
                if f.read() == content:
                    return
        with open(path, "w") as f:
            f.write(content)

    counts = {k: 0 for k in MIN_MATCHES}
    sources: List[str] = []
    impl_ops: List[str] = []
    binding_files: List[str] = []
    outputs: Dict[str, str] = {}
    files = sorted(os.listdir(cuda_src))
    if not files:
        _fail(cuda_src, "sources", "csrc/cuda is empty")
    for fname in files:
        path = os.path.join(cuda_src, fname)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            text = f.read()
        ext = os.path.splitext(fname)[1]
        check_runtime_calls(path, text)
        if ext in (".cu", ".cuh") or (ext in (".h", ".hpp", ".cuh") and DEVICE_MARKERS.search(code_view(text))):
            check_unsupported(path, text)
            text, n = rewrite_launches(path, text)
            counts["kernel launch `<<<...>>>`"] += n
            # Before the __shared__ rewrite, whose output contains a reinterpret_cast of its own.
            text, n_deref, _ = rewrite_reinterpret_casts(path, text)
            counts["dereferenced pointer `reinterpret_cast` (vector load/store)"] += n_deref
            text, n_ext, n_static = rewrite_shared(path, text)
            counts["`extern __shared__` array"] += n_ext
            counts["static `__shared__` array"] += n_static
            text, n_k, n_lb = rewrite_kernels(path, text)
            counts["`__global__` kernel"] += n_k
            counts["`__launch_bounds__`"] += n_lb
            text = ('// Generated by tests/cuda_emulation/build.py from ' + os.path.relpath(path, ROOT) +
                    f' (do not edit).\n#include "emulator.h"\n#line 1 "{path}"\n' + text)
            out_name = fname if ext != ".cu" else "emu_" + fname[:-3] + ".cpp"
            if ext == ".cu":
                sources.append(os.path.join(src_dir, out_name))
        elif ext in (".h", ".hpp"):
            out_name = fname  # host header: copied as is
        elif ext in (".cpp", ".cc", ".cxx"):
            if DEVICE_MARKERS.search(code_view(text)):
                _fail(path, "host bindings", "device code (`__global__`, `<<<`, ...) in a host .cpp file")
            text, n_is_cuda, n_impl, names = rewrite_bindings(path, text)
            counts["`.is_cuda()` device check"] += n_is_cuda
            counts[f"`TORCH_LIBRARY_IMPL({SOURCE_NAMESPACE}, CUDA, ...)` block"] += n_impl
            impl_ops += names
            if any(re.search(r"#\s*include\s*[<\"]" + re.escape(h), text) for h in STUB_HEADERS):
                text += ("\n#ifndef FR_EMU_C10_CUDA_STUBS\n#error \"emulator: the stand-ins in build_dir/include "
                         "for c10/cuda headers were not used (include order)\"\n#endif\n")
            text = ("// Generated by tests/cuda_emulation/build.py from " + os.path.relpath(path, ROOT) +
                    f' (do not edit).\n#line 1 "{path}"\n' + text)
            out_name = fname
            sources.append(os.path.join(src_dir, out_name))
            if n_impl:
                binding_files.append(os.path.join(src_dir, out_name))
        else:
            _fail(path, "sources", f"unknown kind of file in csrc/cuda ({fname}); teach build.py about it")
        outputs[os.path.join(src_dir, out_name)] = text

    for pattern, minimum in MIN_MATCHES.items():
        if counts[pattern] < minimum:
            _fail(cuda_src, pattern, f"matched {counts[pattern]} time(s), expected at least {minimum}")
    if len(binding_files) != 1:
        _fail(cuda_src, f"`TORCH_LIBRARY_IMPL({SOURCE_NAMESPACE}, CUDA, ...)` block",
              f"found in {len(binding_files)} files, expected exactly 1")
    var, body, schema_ops = library_schemas(ops_path)
    unknown = sorted(set(impl_ops) - set(schema_ops))
    if unknown:
        _fail(cuda_src, "op registrations", f"CUDA implementations of ops without a schema in csrc/ops.cpp: {unknown}")
    outputs[binding_files[0]] += (f"\n// Schemas copied from csrc/ops.cpp by tests/cuda_emulation/build.py.\n"
                                  f"TORCH_LIBRARY({EMU_NAMESPACE}, {var}) {{{body}}}\n")
    for rel, content in STUB_HEADERS.items():
        outputs[os.path.join(inc_dir, rel)] = content
    runtime = os.path.join(src_dir, "emulator_runtime.cpp")
    outputs[runtime] = RUNTIME_TU
    sources.append(runtime)

    for path, content in outputs.items():
        write(path, content)
    for d in (src_dir, inc_dir):  # files of an earlier generation that no longer exist in csrc/cuda
        for dirpath, _, fnames in os.walk(d):
            for fn in fnames:
                if os.path.abspath(os.path.join(dirpath, fn)) not in written:
                    os.remove(os.path.join(dirpath, fn))
    return GeneratedSources(src_dir, inc_dir, sources, counts, schema_ops, impl_ops)


# ---------------------------------------------------------------------------------------------------------
# Build

def _asan_flags() -> Tuple[List[str], List[str]]:
    if os.environ.get("FUSED_RESNET_EMU_ASAN", "0") != "1":
        return [], []
    preload = os.environ.get("LD_PRELOAD", "")
    if "asan" not in preload or "stdc++" not in preload:
        # python itself is not linked with libstdc++: without it preloaded, ASan's __cxa_throw interceptor
        # has nothing to forward to and the first C++ exception (a TORCH_CHECK) aborts the process.
        raise RuntimeError(
            "FUSED_RESNET_EMU_ASAN=1: the ASan runtime (and libstdc++, for C++ exceptions) must be preloaded "
            "into python, e.g.\n"
            '  LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" '
            "ASAN_OPTIONS=detect_leaks=0 FUSED_RESNET_EMU_ASAN=1 python -m pytest tests/test_cuda_emulated.py -s")
    return ["-fsanitize=address", "-fno-omit-frame-pointer"], ["-fsanitize=address"]


_BUILT: Dict[str, object] = {}


def build_emulated_extension(build_dir: str, verbose: bool = False):
    """Generates the emulated sources from the current csrc/cuda and csrc/ops.cpp into build_dir and
    compiles them. Returns the extension's Python module (emulator controls, see emulator.h) with the
    attributes `ops` (torch.ops.fused_resnet_emu) and `generated` (GeneratedSources). The ops take CPU
    tensors. One build per process (the op namespace can be registered once)."""
    build_dir = os.path.abspath(build_dir)
    if _BUILT:
        (prev_dir, module), = _BUILT.items()
        if prev_dir != build_dir:
            raise RuntimeError(f"the emulated extension is already loaded in this process (from {prev_dir})")
        return module
    reason = cuda_headers_missing_reason()
    if reason:
        raise CudaHeadersMissing(reason)
    cuda_home = find_cuda_home()

    import torch
    from torch.utils import cpp_extension

    os.makedirs(build_dir, exist_ok=True)
    gen = generate_sources(build_dir)
    obj_dir = os.path.join(build_dir, "obj")
    os.makedirs(obj_dir, exist_ok=True)
    defines = [f for f in getattr(cpp_extension, "COMMON_NVCC_FLAGS", []) if f.startswith("-D")] or [
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__"]
    asan_c, asan_l = _asan_flags()
    cflags = ["-std=c++20", "-O1", "-g0", "-ffp-contract=off", "-fno-strict-aliasing", "-pthread",
              "-Wno-unknown-pragmas", "-Wno-attributes"] + defines + asan_c
    module = cpp_extension.load(
        name=EXTENSION_NAME,
        sources=gen.sources,
        # -I (searched before torch's -isystem paths): the rewritten sources, the c10/cuda stand-ins, the
        # emulator, csrc (common/), the CUDA headers.
        extra_include_paths=[gen.src_dir, gen.include_dir, HERE, CSRC, os.path.join(cuda_home, "include")],
        extra_cflags=cflags,
        extra_ldflags=["-pthread"] + asan_l,
        build_directory=obj_dir,
        verbose=verbose,
        with_cuda=False,
        is_python_module=True,
    )
    module.ops = getattr(torch.ops, EMU_NAMESPACE)
    module.generated = gen
    module.asan = bool(asan_c)
    _BUILT[build_dir] = module
    return module


if __name__ == "__main__":  # python tests/cuda_emulation/build.py [build_dir]: generate + build, print a summary
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "cuda_emulation")
    mod = build_emulated_extension(out, verbose=True)
    print("built", mod.__file__)
    for k, v in mod.generated.counts.items():
        print(f"  {v:3d}  {k}")
    print("  ops:", ", ".join(mod.generated.cuda_impl_ops))
