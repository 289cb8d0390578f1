"""The README's runnable example runs as printed: no undefined names, and the checkpoint it writes loads into
the torchvision-compatible reference model with strict keys."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from fused_resnet.models import torchvision_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- runnable example: tests/test_readme.py -->"


def _example() -> str:
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert readme.count(MARKER) == 1, "the README must hold exactly one runnable example block"
    match = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", readme, re.S)
    assert match, "the marker must be followed by a ```python block"
    return match.group(1)


def test_readme_training_loop_runs_as_printed(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_example())
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses), proc.stdout
    state = torch.load(tmp_path / "resnet18_fused.pt", weights_only=True)
    torchvision_reference.build("resnet18", num_classes=10).load_state_dict(state, strict=True)
