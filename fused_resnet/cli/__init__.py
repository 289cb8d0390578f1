"""The command line: ``fused-resnet <subcommand>`` or ``python -m fused_resnet <subcommand>``.

    bench    end-to-end training/inference throughput: eager vs torch.compile vs fused (+ compile)
    micro    kernel microbenchmarks (GB/s, FLOP/s) against the device's measured copy and matmul rates
    memory   peak memory and saved-activation bytes per stage, eager vs fused
    train    train the fused and the eager ResNet from one seed on a real dataset; curves and a parity verdict
    check    parity check of this installation on this device, every available backend

Each writes a JSON file (and a PNG chart where matplotlib is installed) into --out, only when it completes.
User mistakes print one line and exit with code 2; a failed parity check exits with 1; a `train` verdict
that is INCONCLUSIVE (too few test images or steps for the check to mean anything) with 3; Ctrl-C with 130.
"""
from __future__ import annotations

import argparse
import sys

from .common import CLIError


def build_parser() -> argparse.ArgumentParser:
    from . import bench, check, memory, micro, train

    parser = argparse.ArgumentParser(prog="fused-resnet", description=__doc__.split("\n\n")[0],
                                     epilog="Run `fused-resnet <subcommand> --help` for its options.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="{bench,micro,memory,train,check}")
    for module in (bench, micro, memory, train, check):
        module.add_parser(sub)
    return parser


def _version() -> str:
    from .. import __version__

    return f"fused_resnet {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    from .. import backends

    if backends.environment_error() is not None:
        print(f"fused-resnet {args.command}: error: {backends.environment_error()}", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except CLIError as exc:
        print(f"fused-resnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfused-resnet {args.command}: interrupted; no result files were written", file=sys.stderr)
        return 130

