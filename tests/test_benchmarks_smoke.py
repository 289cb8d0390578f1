"""The benchmark harness runs (tiny sizes, any device), so it cannot rot between GPU sessions.
It measures nothing: speed lives in benchmarks/, figures in benchmarks/RESULTS.md."""
import json
import os
import subprocess
import sys

import pytest
import torch
from test_measurement import assert_tables_well_formed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_microbenchmark_harness_smoke(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/bench_batch_norm.py", "--smoke", "-q", "-p",
           "no:cacheprovider", "-k", "layer4.bn3", "--providers", "triton,cpu,eager", "--results-json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "fused BatchNorm microbenchmarks" in result.stdout
    ours = result.stdout[result.stdout.index("fused BatchNorm microbenchmarks"):result.stdout.index("results written")]
    assert assert_tables_well_formed(ours) == 1 and "speed-up vs eager" in ours
    data = json.loads(out.read_text())
    interpreted = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    assert data["schema"] == "fused_resnet.bench_batch_norm/2" and "git_commit" in data["environment"]
    passes = {(r["provider"], r["direction"]) for r in data["results"]}
    assert ("eager", "fwd") in passes and ("eager", "bwd") in passes
    for r in data["results"]:
        t = r["time_us"]
        assert len(t["samples"]) == t["n"] == 20 and t["min"] <= t["median"] <= t["max"]  # ROUNDS rounds
        assert r["gb_per_s"] == pytest.approx(r["moved_bytes"] / t["median"] / 1e3)
        # conftest sets TRITON_INTERPRET=1 off CUDA: every Triton row says it ran in the interpreter.
        assert r["interpreted"] == (r["provider"] == "triton" and interpreted)
    assert data["roof"]["copy"]["gb_per_s"] > 0 and data["interpreted"] is interpreted
    assert ("MEASURED IN TRITON'S INTERPRETER" in result.stdout) is interpreted


def test_end_to_end_benchmark_script_forwards_to_the_cli(tmp_path):
    cmd = [sys.executable, "benchmarks/bench_resnet.py", "--arch", "resnet18", "--batch", "2", "--size", "32",
           "--steps", "1", "--warmup", "0", "--variants", "eager,fused", "--no-parity", "--quiet", "--out",
           str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["variant"] for r in data["results"]] == ["eager", "fused"]
    assert all(r["train_img_per_s"] > 0 and r["infer_img_per_s"] > 0 for r in data["results"])


def test_convolution_benchmark_harness_smoke(tmp_path):
    """benchmarks/bench_conv.py at a tiny size: every provider that can run here, forward and backward, a JSON
    row per case and a winner per shape (the fused one in Triton's interpreter, when TRITON_INTERPRET=1)."""
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    cmd = [sys.executable, "benchmarks/bench_conv.py", "--smoke", "--batch", "1", "--size", "32", "--shapes",
           "layer1.0.conv1,layer1.0.conv2", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads((tmp_path / "bench_conv.json").read_text())
    assert data["schema"] == "fused_resnet.bench_conv/2" and data["config"]["dtype"] == "fp32"
    cases = {(r["name"], r["provider"], r["direction"]) for r in data["results"]}
    assert {("layer1.0.conv2", p, d) for p in ("cudnn", "cudnn+bn", "fused") for d in ("fwd", "bwd")} <= cases
    assert all(r["time_us"]["median"] > 0 and r["tflop_per_s"] > 0 for r in data["results"])
    interpreted = env["TRITON_INTERPRET"] == "1"
    assert all(r["interpreted"] == (r["provider"] == "fused" and interpreted) for r in data["results"])
    assert data["interpreted"] is interpreted and ("MEASURED IN TRITON'S INTERPRETER" in result.stdout) is interpreted
    assert set(data["winners"].values()) <= {"fused", "cudnn+bn"} and len(data["winners"]) == 2
    assert "| shape " in result.stdout and assert_tables_well_formed(result.stdout) == 1
