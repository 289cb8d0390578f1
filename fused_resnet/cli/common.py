"""What every subcommand shares: argument types, user errors, the device/dtype choice, progress bars, the
terminal table, and result files written whole or not at all."""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time

import torch

from ..benchmarking.report import (SCHEMA_VERSION, device_name, environment, format_table, json_safe,  # noqa: F401
                                   result_document)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CLIError(Exception):
    """A user mistake or an unmet requirement: printed as one line, exit code 2, no traceback."""


# ---------------------------------------------------------------------------------------------------------
# The parser: one-line usage errors with a close-match suggestion


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (no usage block: ``--help`` has it) and, for a misspelt
    option or choice, the closest valid one. Subparsers made by ``add_subparsers`` are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_suggest_choice(message)} (see {self.prog} --help)\n")

    def _get_option_tuples(self, option_string: str):
        # An abbreviation matching several spellings of one option (--bat: --batch, --batch-size) is that
        # option, not an ambiguity.
        tuples, actions = [], set()
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in actions:
                actions.add(id(t[0]))
                tuples.append(t)
        return tuples

    def option_strings(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings]

    def error_unrecognized(self, extras: list[str]):
        """Report arguments that no option of this parser takes, naming the closest options (exit code 2)."""
        hints = {}
        for arg in extras:
            if arg.startswith("-") and len(arg) > 1:
                word = arg.split("=", 1)[0]
                match = difflib.get_close_matches(word, self.option_strings(), n=1, cutoff=0.6)
                if match:
                    hints[word] = match[0]
        message = f"unrecognized arguments: {' '.join(extras)}"
        if len(hints) == 1:
            message += f"; did you mean {next(iter(hints.values()))}?"
        elif hints:
            message += "; did you mean " + ", ".join(f"{m} for {w}" for w, m in hints.items()) + "?"
        self.error(message)


def _suggest_choice(message: str) -> str:
    """argparse's "invalid choice: 'X' (choose from ...)", plus the closest choice when one is close."""
    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not found:
        return message
    choices = [c.strip().strip("'\"") for c in found.group(2).split(",")]
    match = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6)
    return f"{message}; did you mean {match[0]}?" if match else message


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


# The spellings users bring from timm's and torchvision's training scripts are accepted as aliases: each
# alias writes the same attribute as the option it stands for, so run() never sees the difference.


def add_arch_argument(parser: argparse.ArgumentParser, choices, default: str | None, help: str | None = None) -> None:
    parser.add_argument("--arch", "--model", dest="arch", choices=list(choices), default=default, metavar="ARCH",
                        help=(f"{help}; " if help else f"default {default}; ") + "one of " + ", ".join(choices))


def add_batch_argument(parser: argparse.ArgumentParser, default: int | None, help: str) -> None:
    parser.add_argument("-b", "--batch", "--batch-size", dest="batch", type=positive_int, default=default,
                        metavar="N", help=help)


def add_size_argument(parser: argparse.ArgumentParser, default: int | None, help: str) -> None:
    parser.add_argument("--size", "--img-size", dest="size", type=positive_int, default=default, metavar="PIXELS",
                        help=help)


def add_dtype_arguments(parser: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """--dtype and --amp. ``default`` None: the subcommand picks one per device. The option's own default is
    None in every case, so that finish_arguments can tell an explicit --dtype that contradicts --amp."""
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help=help)
    parser.add_argument("--amp", action="store_true",
                        help="autocast in the device's half type: bf16 where supported, else fp16 (bf16 on CPU)")
    parser.set_defaults(dtype_default=default)


def add_memory_format_arguments(parser: argparse.ArgumentParser, default: str = "channels_last") -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--memory-format", choices=["channels_last", "contiguous"], default=default,
                       help=f"layout of the activations (default {default})")
    group.add_argument("--channels-last", dest="memory_format", action="store_const", const="channels_last",
                       help="the same as --memory-format channels_last")


def amp_dtype(device: torch.device) -> str:
    """The autocast dtype --amp means on ``device``."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def finish_arguments(args: argparse.Namespace) -> None:
    """What the parser cannot settle alone, before run(): --amp against --dtype (it needs the device)."""
    if not hasattr(args, "dtype_default"):
        return
    if args.amp:
        half = amp_dtype(resolve_device(args.device))
        if args.dtype is not None and args.dtype != half:
            raise CLIError(f"--amp means {half} autocast on this device; it contradicts --dtype {args.dtype} "
                           "(pass one of them)")
        args.dtype = half
    elif args.dtype is None:
        args.dtype = args.dtype_default


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
# Memory: what is available, and what to say when a run does not fit


def available_memory() -> int | None:
    """Bytes of host memory this process can still take (None when unknown): the kernel's MemAvailable, capped
    by the cgroup limit (containers, SLURM jobs) when one is set."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f, open(usage_file) as g:
                limit, usage = f.read().strip(), int(g.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            limits.append(max(int(limit) - usage, 0))
        break
    return min(limits) if limits else None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def batch_that_fits(batch: int, need: float, usable: float) -> int:
    """The batch to suggest after ``batch`` needed at least ``need`` bytes of ``usable``: memory taken as
    proportional to the batch, with 10% kept free (fragmentation, workspace). ``need`` is only what was
    allocated before the failure, so this is an upper estimate. Rounded down to a multiple of 8 from 16 up."""
    fit = int(batch * 0.9 * usable / max(need, 1.0))
    if fit >= batch:  # it did not fit at ``batch`` all the same (fragmentation, another process): halve it
        fit = batch // 2
    return fit - fit % 8 if fit >= 16 else max(fit, 0)


_REQUEST = re.compile(r"(?:Tried to allocate|tried to allocate) ([0-9.]+) ?(GiB|MiB|KiB|bytes|B)")
_UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "bytes": 1, "B": 1}


def out_of_memory_cause(exc: BaseException | None) -> BaseException | None:
    """The allocation failure behind ``exc`` (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError,
    Python's MemoryError), itself or what it was raised from (torch.compile wraps errors), else None."""
    for _ in range(8):
        if exc is None:
            return None
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
                isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def out_of_memory_message(exc: BaseException, device_spec: str | None, batch: int | None) -> str:
    """One line: where memory ran out and which --batch would fit (estimated as in batch_that_fits)."""
    exc = out_of_memory_cause(exc) or exc
    found = _REQUEST.search(str(exc))
    request = float(found.group(1)) * _UNITS[found.group(2)] if found else 0.0
    try:
        device = resolve_device(device_spec)
    except CLIError:
        device = torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        # Memory that neither this process's tensors nor its cache hold: other processes and CUDA contexts.
        usable = total - max(total - free - torch.cuda.memory_reserved(device), 0)
        peak = torch.cuda.max_memory_allocated(device)
        where = f"CUDA out of memory on {device} ({torch.cuda.get_device_name(device)})"
        what = "allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak resident size (KiB on Linux)
        usable = peak + (available_memory() or 0)
        where, what = "out of memory on the CPU", "resident"
    if batch is None:
        return f"{where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    need = peak + request
    fit = batch_that_fits(batch, need, usable)
    measured = (f"{gib(peak)} {what} at the peak + {gib(request)} requested, of {gib(usable)} usable"
                if found else f"{gib(peak)} {what} at the peak, of {gib(usable)} usable")
    if fit < 2:
        return f"{where} at --batch {batch} ({measured}): no batch of 2 or more fits by this estimate"
    return (f"{where} at --batch {batch} ({measured}); --batch {fit} should fit (estimated: 90% of usable "
            "memory, in proportion to the batch; an upper estimate, halve it if it fails again)")


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


COMMITTED: list[str] = []  # every file a ResultWriter moved into place in this process (for main()'s messages)


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
            json.dump(json_safe(data), f, indent=1, allow_nan=False)
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
        """Move the staged files into the output folder; returns their final paths. What the run printed is
        flushed first: output that cannot be delivered (stdout closed, as by ``| head``) stops the commit."""
        sys.stdout.flush()
        final = []
        for name in self.files:
            src = os.path.join(self.staging, name)
            if os.path.exists(src):
                dst = os.path.join(self.out, name)
                os.replace(src, dst)
                final.append(dst)
                COMMITTED.append(dst)
        self.discard()
        return final

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
