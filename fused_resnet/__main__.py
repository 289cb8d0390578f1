"""``python -m fused_resnet``: the main job (see fused_resnet/demo.py)."""
import sys

from .demo import main

sys.exit(main())
