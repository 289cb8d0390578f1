"""``fused-resnet info``: what this installation is and can run, for bug reports (in the spirit of
``python -m xformers.info`` and ``torch.utils.collect_env``): versions, how the extension was built, every
backend on every device type with the reason when it cannot run, which one automatic selection picks, the
devices, and the environment variables that change fused_resnet's behaviour. Nothing is computed on a
device and nothing is written; ``--json`` prints the same as one JSON object.

An invalid FUSED_RESNET_BACKEND is shown with the rest, then reported as the one-line error (exit code 2).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys

import torch

from .. import backends

HELP = "versions, build, backends (and why each is or is not available), devices, environment"
ENV_VARS = ("FUSED_RESNET_BACKEND", "FUSED_RESNET_CONV", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES",
            "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "FUSED_RESNET_CUDA", "TORCH_CUDA_ARCH_LIST",
            "FUSED_RESNET_CUTLASS", "CUDA_HOME", "MAX_JOBS")
OPTIONAL = ("triton", "numpy", "matplotlib", "scikit-learn", "pillow", "torchvision")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.set_defaults(run=run)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[dict]:
    cpu = dict(device="cpu", name=platform.processor() or platform.machine(), cores=os.cpu_count(),
               torch_threads=torch.get_num_threads())
    devices = [cpu]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(dict(device=f"cuda:{i}", name=props.name, capability=f"{props.major}.{props.minor}",
                                memory_gib=round(props.total_memory / 2**30, 1),
                                multiprocessors=props.multi_processor_count,
                                bf16=props.major >= 8))
    return devices


def collect() -> dict:
    """Everything the report shows, as plain data."""
    from .. import __version__

    extension = sys.modules.get("fused_resnet._C")
    build = backends.build_info()
    return dict(
        versions=dict(fused_resnet=__version__, torch=torch.__version__, torch_cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                      python=platform.python_version(), platform=platform.platform(),
                      **{name: _version(name) for name in OPTIONAL}),
        build=dict(extension=build["extension"], extension_file=getattr(extension, "__file__", None),
                   extension_error=build["extension_error"], extension_cuda_kernels=build["extension_cuda_kernels"],
                   extension_built_with_torch=build.get("extension_built_with_torch"),
                   triton_installed=build["triton_installed"], triton_interpret=build["triton_interpret"]),
        backends={d: {b: dict(zip(("available", "reason"), backends.backend_status(b, d))) for b in backends.BACKENDS}
                  for d in ("cpu", "cuda")},
        auto_order={d: list(order) for d, order in backends.AUTO_ORDER.items()},
        requested=build["default"],
        resolved=build["resolved"],
        devices=_devices(),
        cuda_available=build["cuda_available"],
        environment={name: os.environ.get(name) for name in ENV_VARS},
        environment_error=build["environment_error"],
    )


def _lines(info: dict) -> list[str]:
    def section(title, pairs):
        width = max(len(k) for k, _ in pairs)
        return [f"{title}:"] + [f"  {k.ljust(width)}  {'-' if v is None else v}" for k, v in pairs] + [""]

    b = info["build"]
    lines = section("versions", list(info["versions"].items()))
    lines += section("build", [
        ("extension fused_resnet._C", "loaded" if b["extension"] else f"NOT loaded: {b['extension_error']}"),
        ("  file", b["extension_file"]),
        ("  CUDA kernels", "yes" if b["extension_cuda_kernels"] else "no"),
        ("  compiled against torch", b["extension_built_with_torch"] or "not recorded (a build older than the record)"),
        ("triton", "installed" if b["triton_installed"] else "not installed"),
        ("TRITON_INTERPRET", "1 (Triton runs CPU tensors in its interpreter)" if b["triton_interpret"] else "off"),
    ])
    for device_type, status in info["backends"].items():
        resolved = info["resolved"].get(device_type)
        pairs = [(name, "available" if s["available"] else f"unavailable: {s['reason']}") for name, s in status.items()]
        pairs.append(("automatic choice", resolved if resolved is not None else
                      ("- (CUDA is not available)" if device_type == "cuda" else "-")))
        lines += section(f"backends for {device_type} tensors (automatic order: "
                         f"{', '.join(info['auto_order'].get(device_type, ()))})", pairs)
    requested = info["requested"]
    lines += section("backend request", [("process-wide", requested if info["environment_error"] is None
                                           else f"INVALID: {info['environment_error']}")])
    for d in info["devices"]:
        lines += section(f"device {d['device']}", [(k, v) for k, v in d.items() if k != "device"])
    if not info["cuda_available"]:
        why = "torch is a CPU build" if info["versions"]["torch_cuda"] is None else "none visible"
        lines += [f"no CUDA device: {why}", ""]
    lines += section("environment", list(info["environment"].items()))
    return lines[:-1]


def run(args) -> int:
    from .common import CLIError

    info = collect()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print("\n".join(_lines(info)))
    if info["environment_error"] is not None:
        sys.stdout.flush()
        raise CLIError(info["environment_error"])
    return 0
