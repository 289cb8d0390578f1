"""Offline compilation of fused_resnet's Triton kernels for a GPU that is not here (sm_90, the H100/H200).

The launches come from fused_resnet/kernels/launch_plan.py (every kernel at ResNet-50's shapes at batch 256,
bf16 and fp32, recorded on meta tensors). ``compile_launch`` compiles one as Triton's JIT would specialise it,
with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)); ptxas and cuobjdump ship in the triton
wheel. ``resources`` reads registers, stack and spills (local memory) from the cubin.

    python tests/triton_compile.py REPORT.json      (without TRITON_INTERPRET; tests/test_triton_compile.py)
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

from fused_resnet.kernels.launch_plan import Launch, key, record_resnet50, specialise

TARGET_SM = 90


@dataclass
class Compiled:
    name: str
    label: str
    num_warps: int
    num_stages: int
    registers: int
    stack: int
    local: int
    shared: int
    wgmma: int
    mma_sync: int
    constexprs: dict = field(default_factory=dict)


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in fields.items()}


def compile_launch(launch: Launch) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialise(launch, TARGET_SM)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", TARGET_SM, 32),
                              options={"num_warps": options.get("num_warps", 4),
                                       "num_stages": options.get("num_stages", 3)})
    res = resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return Compiled(launch.kernel.fn.__name__, launch.label, options.get("num_warps", 4), options.get("num_stages", 3),
                    res.get("reg", 0), res.get("stack", 0), res.get("local", 0), compiled.metadata.shared,
                    ptx.count("wgmma.mma_async"), len(re.findall(r"\bmma\.sync", ptx)),
                    {k: v for k, v in constexprs.items() if k.isupper()})


def main(argv=None) -> int:
    """python tests/triton_compile.py REPORT.json: record, compile every distinct launch, write the report.
    Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones)."""
    import argparse
    import json
    import sys

    import triton

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("triton_compile: run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    undo = []

    def setattr_(obj, name, value):
        undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        launches = record_resnet50(setattr_)
        # fp32 with TF32 off, what the tests and the e2e accuracy run use (tests/conftest.py): IEEE tl.dot on
        # the CUDA cores, with its own tiles (kernels/conv_configs.py, fma_dot).
        setattr_(torch.backends.cudnn, "allow_tf32", False)
        launches += record_resnet50(setattr_, dtypes=(torch.float32,))
    finally:
        for obj, name, value in reversed(undo):
            setattr(obj, name, value)
    unique = {}
    for launch in launches:
        unique.setdefault(key(launch), launch)
    results, failures = [], []
    for launch in unique.values():
        try:
            results.append(compile_launch(launch))
        except Exception as exc:
            failures.append(f"{launch.kernel.fn.__name__} [{launch.label}]: {type(exc).__name__}: {str(exc)[:600]}")
    dtypes = sorted({str(a.dtype) for launch in launches for a in launch.args
                     if isinstance(a, torch.Tensor) and a.dim() == 4})
    with open(args.report, "w") as f:
        json.dump(dict(target=f"sm_{TARGET_SM}", triton=triton.__version__, launches=len(launches),
                       distinct=len(unique), activation_dtypes=dtypes, failures=failures,
                       kernels=[r.__dict__ for r in results]), f, indent=1, default=str)
    for r in sorted(results, key=lambda r: (r.name, -r.registers)):
        print(f"{r.name:28s} regs {r.registers:3d} smem {r.shared:6d} local {r.local} stack {r.stack} "
              f"wgmma {r.wgmma:2d} warps {r.num_warps} stages {r.num_stages}  {r.label}")
    print(f"{len(launches)} launches, {len(unique)} distinct compiles, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
