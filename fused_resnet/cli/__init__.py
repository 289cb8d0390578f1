"""The command line: ``fused-resnet <subcommand>`` or ``python -m fused_resnet <subcommand>``.

    bench    end-to-end training/inference throughput: eager vs torch.compile vs fused (+ compile)
    micro    kernel microbenchmarks (GB/s, FLOP/s) against the device's measured copy and matmul rates
    memory   peak memory and saved-activation bytes per stage, eager vs fused
    train    train the fused and the eager ResNet from one seed on a real dataset; curves and a parity verdict
    check    parity check of this installation on this device, every available backend
    info     versions, build, backends (and why each is or is not available), devices, environment

Each writes a JSON file (and a PNG chart where matplotlib is installed) into --out, only when it completes.
timm's and torchvision's spellings work too: -b/--batch-size, --model, --img-size, --amp, --channels-last.
A user mistake prints one line and exits with code 2 (out of memory, a closed stdout and an invalid
FUSED_RESNET_BACKEND included); a failed parity check exits with 1; a `train` verdict that is INCONCLUSIVE
(too few test images or steps for the check to mean anything) with 3; Ctrl-C with 130; SIGTERM with 143.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from . import common
from .common import CLIError, Parser

COMMANDS = ("bench", "micro", "memory", "train", "check", "info")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a batch scheduler's pre-emption), raised in the main thread where it arrives. A
    KeyboardInterrupt, so it unwinds exactly as Ctrl-C does: ``except Exception`` does not stop it, and every
    ResultWriter on the way discards its staging folder."""


def build_parser() -> Parser:
    from . import bench, check, info, memory, micro, train

    parser = Parser(prog="fused-resnet", description=__doc__.split("\n\n")[0],
                    epilog="Run `fused-resnet <subcommand> --help` for its options.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for module in (bench, micro, memory, train, check, info):
        module.add_parser(sub)
    parser.subcommands = sub.choices
    return parser


def _version() -> str:
    from .. import __version__

    return f"fused_resnet {__version__}"


def _error(command: str, message: str) -> None:
    """The one line of a failed run, on stderr (which may be closed too)."""
    # On a terminal a progress bar may hold the line: start a fresh one.
    lead = "\n" if hasattr(sys.stderr, "isatty") and sys.stderr.isatty() else ""
    with contextlib.suppress(OSError, ValueError):
        print(f"{lead}fused-resnet {command}: {message}", file=sys.stderr, flush=True)


def _files_note(before: int) -> str:
    written = common.COMMITTED[before:]
    if not written:
        return "no result files were written"
    return f"{len(written)} result file(s) had been written (the last: {written[-1]})"


def _discard_stdout() -> None:
    """After EPIPE on stdout: point it at /dev/null, so that the interpreter's last flush does not fail again
    (what the Python documentation recommends for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While the body runs, SIGTERM raises Terminated in the main thread (once: a second SIGTERM during the
    clean-up is ignored); the previous handler is back afterwards. Signals can only be handled in the main
    thread, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"armed": True}

    def handler(signum, frame):
        if state["armed"]:
            state["armed"] = False
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        state["armed"] = False
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # reported by the subcommand's own parser, which knows the options that were meant
        parser.subcommands.get(args.command, parser).error_unrecognized(extras)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    from .. import backends

    # `info` reports an invalid FUSED_RESNET_BACKEND itself, after showing everything else.
    if args.command != "info" and backends.environment_error() is not None:
        _error(args.command, f"error: {backends.environment_error()}")
        return 2
    committed_before = len(common.COMMITTED)
    with _sigterm_as_interrupt():
        try:
            from .common import finish_arguments, out_of_memory_cause, out_of_memory_message

            finish_arguments(args)
            rc = args.run(args)
            sys.stdout.flush()  # a closed stdout fails here, inside the handlers below
            return rc
        except CLIError as exc:
            _error(args.command, f"error: {exc}")
            return 2
        except BrokenPipeError:
            _discard_stdout()
            _error(args.command, "error: standard output was closed before the output was complete (its reader "
                                 "exited, as with `| head`); " + _files_note(committed_before))
            return 2
        except Terminated:
            _error(args.command, f"terminated (SIGTERM); {_files_note(committed_before)}")
            return 143
        except KeyboardInterrupt:
            _error(args.command, f"interrupted; {_files_note(committed_before)}")
            return 130
        except (RuntimeError, MemoryError) as exc:
            if out_of_memory_cause(exc) is None:
                raise
            _error(args.command, "error: " + out_of_memory_message(exc, getattr(args, "device", None),
                                                                   getattr(args, "batch", None)))
            return 2
