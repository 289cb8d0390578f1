"""What every result shares, whoever writes it (the CLI, benchmarks/, bench_conv.py): the one table formatter,
the dtype names, the run's provenance and the result document (schema version 2).

JSON vocabulary (schema 2):
  dtypes      "fp32", "bf16", "fp16", "fp64" (the CLI's --dtype names), everywhere
  results     always a list of records (dicts), one per measured thing
  units       in the key, as a suffix: _us, _ms, _s (times), _img_per_s, _gb_per_s, _tflop_per_s (rates),
              _bytes, _mib, _gib (sizes), _flop (counts), _pct (percent); a dimensionless number (ratio,
              relative error, accuracy as a fraction, loss) has no suffix
  timings     a timed figure is an object in its unit: {median, q1, q3, min, max, mean, n, iqr_pct, noisy,
              samples} (see benchmarking/stats.py); rates derived from it use its median
  ratios      {median, low, high} from the quartiles of the two timings (stats.ratio)
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
from typing import Iterable

import torch

SCHEMA_VERSION = 2
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
INTERPRETER_BANNER = ("!!! MEASURED IN TRITON'S INTERPRETER (TRITON_INTERPRET=1): these times say nothing about "
                      "GPU speed !!!")


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).split(".")[-1])


def triton_interpreted() -> bool:
    """Whether Triton kernels run in Triton's interpreter in this process (read once, at import, by Triton)."""
    from .. import backends

    return bool(backends.TRITON_INTERPRET)


# ---------------------------------------------------------------------------------------------------------
# The one table formatter


def format_table(header: list[str], rows: Iterable[list]) -> str:
    """A Markdown table (readable on a terminal, pasteable into RESULTS.md). Every row must have one cell
    per header; a "|" inside a cell is escaped so the cell count stays right."""
    cells = [[_cell(v) for v in row] for row in rows]
    header = [_escape(str(h)) for h in header]
    for r in cells:
        if len(r) != len(header):
            raise ValueError(f"table row has {len(r)} cells for {len(header)} headers: {r}")
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in cells:
        lines.append("| " + " | ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:.2f}"
    return _escape(str(v))


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _numeric(v: str) -> bool:
    return v.replace(",", "").replace(".", "", 1).replace("x", "").replace("-", "").replace("e", "").isdigit()


def speedup_cell(r: dict) -> str:
    """"1.23x (1.10-1.31)": a stats.ratio with its quartile range."""
    if r is None or not math.isfinite(r.get("median") or math.nan):
        return "-"
    return f"{r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f})"


# ---------------------------------------------------------------------------------------------------------
# Provenance


def environment(device: torch.device) -> dict:
    """The run's provenance, recorded in every result file. Nothing here can fail the run: what cannot be
    read is None."""
    from .. import __version__, backends

    info = backends.build_info()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional on CPU
        triton_version = None
    commit, dirty = _git_state()
    env = dict(fused_resnet=__version__, git_commit=commit, git_dirty=dirty, torch=torch.__version__,
               cuda=torch.version.cuda, cudnn=_cudnn_version(), triton=triton_version,
               triton_interpret=triton_interpreted(), python=platform.python_version(), os=platform.platform(),
               device=str(device), device_name=device_name(device), cpu_count=os.cpu_count(),
               load_avg_1m=_load_average(), torch_threads=torch.get_num_threads(),
               torch_interop_threads=torch.get_num_interop_threads(),
               backends_available=backends.available_backends(device), extension=info.get("extension"),
               gpu_driver=None, gpu_clocks_mhz=None)
    if device.type == "cuda":
        env.update(_nvidia_smi(device))
    return env


def _load_average() -> float | None:
    """The 1-minute load average (runnable processes), where the OS reports it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_machine_warning(device: torch.device) -> str | None:
    """A warning when CPU timings share the cores with other work (load average >= the number of cores)."""
    load, cores = _load_average(), os.cpu_count() or 1
    if device.type != "cpu" or load is None or load < cores:
        return None
    return (f"warning: the machine is busy (1-minute load average {load:.1f} on {cores} cores): CPU times include "
            "waiting for other programs; compare figures from one run only, and read their spread")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the package was imported from; (None, None) for an installed copy
    (or one inside some other repository) and where git is missing."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../fused_resnet
    root = os.path.dirname(package)
    out = _run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root)
    if not out or len(out.split()) != 2:
        return None, None
    top, commit = out.split()
    if os.path.realpath(top) != os.path.realpath(root):
        return None, None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return commit, (bool(status.strip()) if status is not None else None)


def _pci(bus_id: str):
    """"00000000:3B:00.0" -> (domain, bus, device)."""
    try:
        domain, bus, rest = bus_id.split(":")
        return int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16)
    except ValueError:
        return None


def _cudnn_version() -> int | None:
    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001
        return None


@functools.lru_cache(maxsize=None)
def _nvidia_smi(device: torch.device) -> dict:
    """Driver version and current/maximum clocks of ``device`` from nvidia-smi (matched by PCI bus id, since
    CUDA's device order need not be nvidia-smi's); empty where nvidia-smi is missing or says nothing."""
    fields = "pci.bus_id,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem"
    out = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if not out:
        return {}
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines()]
    rows = [r for r in rows if len(r) == 6]
    try:
        p = torch.cuda.get_device_properties(device)
        mine = [r for r in rows if _pci(r[0]) == (p.pci_domain_id, p.pci_bus_id, p.pci_device_id)]
    except Exception:  # noqa: BLE001 - older torch without the PCI fields
        mine = rows if len(rows) == 1 else []
    if len(mine) != 1:
        return {}
    _, driver, *clocks = mine[0]

    def mhz(text):
        try:
            return float(text)
        except ValueError:
            return None  # "[N/A]"

    sm, mem, max_sm, max_mem = (mhz(c) for c in clocks)
    return dict(gpu_driver=driver, gpu_clocks_mhz=dict(sm=sm, mem=mem, max_sm=max_sm, max_mem=max_mem))


# ---------------------------------------------------------------------------------------------------------
# The result document


def result_document(command: str, argv: list[str] | None, device: torch.device, config: dict,
                    results: list[dict], **extra) -> dict:
    """The JSON every result file holds: schema tag, command line, time, environment, config, whether any
    result ran in Triton's interpreter, the results (a list of records) and command-specific extras."""
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise TypeError("results must be a list of records (dicts)")
    interpreted = any(r.get("interpreted") for r in results)
    return dict(schema=f"fused_resnet.{command}/{SCHEMA_VERSION}", command=command,
                argv=list(argv) if argv is not None else sys.argv[1:],
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                environment=environment(device), interpreted=interpreted, config=config, results=results,
                **extra)


def json_safe(obj):
    """NaN/inf become null (JSON has no NaN); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str, doc: dict) -> None:
    """For the scripts outside the CLI (the CLI stages its files with ResultWriter)."""
    with open(path, "w") as f:
        json.dump(json_safe(doc), f, indent=1, allow_nan=False)
        f.write("\n")
