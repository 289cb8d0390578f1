"""``python -m fused_resnet <subcommand>``: the command line (see fused_resnet/cli)."""
import sys

from .cli import main

sys.exit(main())
