"""What every subcommand shares: argument types, user errors, the device/dtype choice, progress bars, the
terminal table, and result files written whole or not at all."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch

from ..benchmarking.report import (SCHEMA_VERSION, device_name, environment, format_table,  # noqa: F401
                                   result_document)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CLIError(Exception):
    """A user mistake or an unmet requirement: printed as one line, exit code 2, no traceback."""


# ---------------------------------------------------------------------------------------------------------
# Argument types (argparse turns their ArgumentTypeError into a usage message and exit code 2)


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--out", default=out_default, help=f"output folder for JSON and PNG (default {out_default})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(spec: str | None) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CLIError(f"unknown device {spec!r} (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"device {spec!r}: fused_resnet runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"device {spec!r}: CUDA is not available on this machine (torch {torch.__version__}"
                           f"{', a CPU build' if torch.version.cuda is None else ''})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype ``name`` on ``device``, or a CLIError saying why it cannot run there."""
    if name not in DTYPES:
        raise CLIError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    if device.type == "cpu" and name == "fp16":
        raise CLIError("fp16 is not supported on CPU (PyTorch's CPU convolutions have no fast fp16 path); "
                       "use --dtype bf16 or fp32")
    if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
        raise CLIError(f"bf16 is not supported on {torch.cuda.get_device_name(device)}; use --dtype fp16 or fp32")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line every few seconds elsewhere (logs)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = max(int(total), 1), desc, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done, self.info = 0, ""
        self.start = self.last_print = time.perf_counter()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *_):
        if self.enabled and exc_type is None:
            self._draw(final=True)

    def update(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        if info is not None:
            self.info = info
        now = time.perf_counter()
        if self.enabled and (self.tty and now - self.last_print > 0.1 or now - self.last_print > 5.0):
            self.last_print = now
            self._draw()

    def _draw(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        frac = min(self.done / self.total, 1.0)
        eta = elapsed / frac - elapsed if 0 < frac < 1 else 0.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        text = (f"{self.desc} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s"
                f"{'' if final else f' eta {eta:4.0f}s'}{' ' + self.info if self.info else ''}")
        if self.tty:
            columns = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + text[: columns - 1].ljust(columns - 1) + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------------------
# Terminal table


# format_table: the one table formatter, shared with benchmarks/ (imported above).


# ---------------------------------------------------------------------------------------------------------
# Result files: staged in a hidden folder, moved into place only when the run completes


def _json_safe(obj):
    """NaN/inf become null (JSON has no NaN); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class ResultWriter:
    """Collects a run's output files in a staging folder inside ``out`` and moves them into ``out`` in
    ``commit()``. A run stopped before (Ctrl-C, an error) leaves ``out`` as it was: ``discard()`` removes the
    staging folder, and each move is an atomic rename, so no result file is ever half-written."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as exc:
            raise CLIError(f"cannot create the output folder {out!r}: {exc.strerror}") from None
        if not os.access(self.out, os.W_OK):
            raise CLIError(f"the output folder {out!r} is not writable")
        self.staging = tempfile.mkdtemp(prefix=".staging-", dir=self.out)
        self.files: list[str] = []

    def path(self, name: str) -> str:
        """Where to write ``name`` now (in the staging folder)."""
        if name not in self.files:
            self.files.append(name)
        return os.path.join(self.staging, name)

    def write_json(self, name: str, data: dict) -> None:
        with open(self.path(name), "w") as f:
            json.dump(_json_safe(data), f, indent=1, allow_nan=False)
            f.write("\n")

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *_) -> None:
        self.discard()

    def chart(self, name: str, draw, *args) -> None:
        """Draw ``name`` with ``draw(path, *args)`` (a function of .plots), or say why charts are skipped."""
        from . import plots

        if plots.available():
            draw(self.path(name), *args)
        else:
            print(plots.MISSING)

    def finish(self) -> None:
        """Commit, and tell the user where the files are."""
        for path in self.commit():
            print(f"wrote {path}")

    def commit(self) -> list[str]:
        """Move the staged files into the output folder; returns their final paths."""
        final = []
        for name in self.files:
            src = os.path.join(self.staging, name)
            if os.path.exists(src):
                dst = os.path.join(self.out, name)
                os.replace(src, dst)
                final.append(dst)
        self.discard()
        return final

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
