"""The command line (fused_resnet/cli): every subcommand at tiny sizes on CPU, the files it writes (JSON schema,
PNG charts, checkpoints), user errors (one line, exit code 2, no traceback) and Ctrl-C (nothing half-written).
It measures nothing: the figures these commands print on a GPU go to benchmarks/RESULTS.md. The runs pin
--device cpu so the expected backends are the same on a GPU machine."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

from fused_resnet import dispatch
from fused_resnet.cli import main
from fused_resnet.models import torchvision_reference
from test_measurement import assert_tables_well_formed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(
    __import__("importlib").util.find_spec("matplotlib") is None,
    reason="matplotlib not installed (scripts/setup_env.sh installs it): the charts cannot be checked")


def _doc(path, command):
    doc = json.loads(path.read_text())
    assert doc["schema"] == f"fused_resnet.{command}/2"
    assert doc["command"] == command
    assert isinstance(doc["argv"], list) and doc["argv"][0] == command
    env = doc["environment"]
    for key in ("fused_resnet", "git_commit", "git_dirty", "torch", "cudnn", "triton_interpret", "python", "device",
                "device_name", "load_avg_1m", "torch_threads", "backends_available", "gpu_driver", "gpu_clocks_mhz"):
        assert key in env, key
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["triton_interpret"] == (os.environ.get("TRITON_INTERPRET") == "1")
    assert env["gpu_driver"] is None and env["gpu_clocks_mhz"] is None  # these runs pin --device cpu
    assert isinstance(doc["config"], dict)
    # One vocabulary: results are always a list of records; dtype names are the CLI's.
    assert isinstance(doc["results"], list) and doc["results"] and all(isinstance(r, dict) for r in doc["results"])
    assert doc["interpreted"] == any(r.get("interpreted") for r in doc["results"])
    for r in doc["results"]:
        assert r.get("dtype", "fp32") in ("fp32", "bf16", "fp16", "fp64")
    return doc


def _timing(t, n):
    """A timed figure: its samples (time order) and their summary, consistent with each other."""
    assert t["n"] == n and len(t["samples"]) == n
    assert t["min"] == min(t["samples"]) > 0 and t["max"] == max(t["samples"])
    assert t["min"] <= t["q1"] <= t["median"] <= t["q3"] <= t["max"]
    assert t["iqr_pct"] == pytest.approx(100 * (t["q3"] - t["q1"]) / t["median"])
    assert t["noisy"] == (t["iqr_pct"] > 10)


def _png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, f"{path} is not a real PNG"


def _no_staging(out):
    assert not [p for p in os.listdir(out) if p.startswith(".staging")], os.listdir(out)


@needs_matplotlib
def test_bench(tmp_path, capsys):
    rc = main(["bench", "--device", "cpu", "--arch", "resnet18", "--batch", "2", "--size", "32", "--steps", "2", "--warmup", "1",
               "--variants", "eager,fused-cpu,fused-eager", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = _doc(tmp_path / "bench.json", "bench")
    assert doc["config"]["arch"] == "resnet18" and doc["config"]["batch"] == 2
    assert [r["variant"] for r in doc["results"]] == ["eager", "fused-cpu", "fused-eager"]
    for r in doc["results"]:
        _timing(r["train_step_ms"], 2)
        _timing(r["infer_step_ms"], 2)
        assert r["train_img_per_s"] == pytest.approx(2 / (r["train_step_ms"]["median"] / 1e3))
        assert r["infer_img_per_s"] == pytest.approx(2 / (r["infer_step_ms"]["median"] / 1e3))
        assert r["saved_mib"] > 0 and r["interpreted"] is False
        assert r["peak_gib"] is None  # NaN off CUDA is written as null, never as an invalid NaN token
        s = r["train_speedup_vs_eager"]
        if r["variant"] == "eager":
            assert s is None
        else:
            # interleaved rounds: the speed-up is the median of the per-round ratios eager step / this step
            assert r["interleaved"] and s["paired_rounds"] == 2
            eager = doc["results"][0]["train_step_ms"]["samples"]
            per_round = sorted(e / m for e, m in zip(eager, r["train_step_ms"]["samples"]))
            assert s["median"] == pytest.approx(sum(per_round) / 2)
            assert s["low"] <= s["median"] <= s["high"]
    fused_saved = {r["variant"]: r["saved_mib"] for r in doc["results"]}
    assert fused_saved["fused-cpu"] < fused_saved["eager"]
    assert [p["backend"] for p in doc["parity"]] == ["cpu", "eager"] and all(p["ok"] for p in doc["parity"])
    assert "| variant" in out and "parity" in out and "speed-up vs eager" in out
    assert assert_tables_well_formed(out) == 1
    _png(tmp_path / "bench.png")
    _no_staging(tmp_path)


@needs_matplotlib
def test_micro(tmp_path, capsys):
    rc = main(["micro", "--device", "cpu", "--smoke", "--shapes", "layer4.bn3", "--rounds", "2", "--providers", "cpu,eager",
               "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert assert_tables_well_formed(out) == 1
    doc = _doc(tmp_path / "micro.json", "micro")
    assert doc["config"]["dtype"] == "fp32" and doc["roof"]["matmul"]["dtype"] == "fp32"
    assert doc["roof"]["copy"]["gb_per_s"] > 0 and doc["roof"]["matmul"]["tflop_per_s"] > 0
    roofs = {c["tensor_bytes"]: c["gb_per_s"] for c in doc["roof"]["copy_by_size"]}
    passes = {(r["provider"], r["direction"]) for r in doc["results"]}
    assert passes == {("cpu", "fwd"), ("cpu", "bwd"), ("eager", "fwd"), ("eager", "bwd"), ("cpu", "stats"),
                      ("cpu", "act"), ("cpu", "reduce"), ("cpu", "elemt")}
    for r in doc["results"]:
        assert r["shape"].startswith("layer4.bn3") and r["time_us"]["median"] > 0 and r["time_us"]["n"] >= 2
        assert r["gb_per_s"] == pytest.approx(r["moved_bytes"] / r["time_us"]["median"] / 1e3)
        assert r["tflop_per_s"] == pytest.approx(r["flop"] / r["time_us"]["median"] / 1e6)
        assert r["copy_gb_per_s"] in roofs.values()
        assert r["of_copy_pct"] == pytest.approx(100 * r["gb_per_s"] / r["copy_gb_per_s"])
        assert (r["speedup_vs_eager"] is None) == (r["provider"] == "eager" or r["direction"] not in ("fwd", "bwd"))
    _png(tmp_path / "micro.png")


@needs_matplotlib
def test_memory(tmp_path, capsys):
    rc = main(["memory", "--device", "cpu", "--arch", "resnet18", "--batch", "2", "--size", "64", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert assert_tables_well_formed(out) == 1
    doc = _doc(tmp_path / "memory.json", "memory")
    assert doc["stages"] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    eager, fused = doc["results"]
    assert (eager["variant"], fused["variant"]) == ("eager", "fused")
    assert eager["backend"] is None and fused["backend"] == doc["config"]["backend"] == "cpu"
    assert set(eager["saved_mib"]) == set(doc["stages"])
    assert abs(sum(eager["saved_mib"].values()) - eager["saved_total_mib"]) < 1e-6
    assert all(eager["saved_mib"][s] > 0 for s in ("stem", "layer1", "layer2", "layer3", "layer4"))
    assert fused["saved_total_mib"] < eager["saved_total_mib"]
    assert fused["saved_mib"]["stem"] < eager["saved_mib"]["stem"]  # BN + ReLU + max-pool recomputed
    assert fused["timeline_mib"][-1] == pytest.approx(fused["saved_total_mib"])
    assert doc["timeline_stages"] == doc["stages"]  # on CPU the timeline is the forward's saved bytes
    for r in (eager, fused):  # where each stage starts in the timeline: in order, inside it
        starts = [r["timeline_stage_starts"][s] for s in doc["stages"] if s in r["timeline_stage_starts"]]
        assert starts[0] == 0 and starts == sorted(starts) and starts[-1] < len(r["timeline_mib"])
        assert r["allocator_snapshot"] is None
    _png(tmp_path / "memory.png")


@needs_matplotlib
def test_train_digits(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the default dataset ships with scikit-learn")
    rc = main(["train", "--device", "cpu", "--limit", "240", "--epochs", "2", "--batch", "32", "--size", "16", "--out", str(tmp_path),
               "--quiet"])
    out = capsys.readouterr().out
    assert rc in (0, 1, 3), out
    doc = _doc(tmp_path / "train.json", "train")
    assert doc["dataset"]["classes"] == [str(i) for i in range(10)]
    assert doc["dataset"]["train_images"] + doc["dataset"]["test_images"] == 240
    steps = doc["dataset"]["train_images"] // 32
    assert [r["variant"] for r in doc["results"]] == ["eager", "fused"]
    eager, fused = doc["results"]
    for h in (eager, fused):
        assert len(h["train_loss"]) == 2 * steps and len(h["test_acc"]) == 2 and len(h["test_loss"]) == 2
        assert all(0 <= a <= 1 for a in h["test_acc"]) and len(h["epoch_s"]) == 2
    # Same seed, same batches, fp32: the first steps agree closely (the trajectories drift apart only later).
    assert fused["train_loss"][0] == pytest.approx(eager["train_loss"][0], rel=1e-4)
    v = doc["verdict"]
    parts = (v["final_test_acc"]["status"], v["last_epoch_train_loss"]["status"])
    assert v["status"] == ("DISAGREE" if "DISAGREE" in parts else "INCONCLUSIVE" if "INCONCLUSIVE" in parts
                           else "AGREE")
    assert v["ok"] == (v["status"] == "AGREE")
    assert rc == v["exit_code"] == {"AGREE": 0, "DISAGREE": 1, "INCONCLUSIVE": 3}[v["status"]]
    # The checkpoint is a torchvision state_dict.
    reference = torchvision_reference.build("resnet18", num_classes=10)
    reference.load_state_dict(torch.load(tmp_path / "checkpoint_fused.pt", weights_only=True), strict=True)
    _png(tmp_path / "train.png")
    assert "parity verdict" in out and assert_tables_well_formed(out) == 1


def test_train_verdict_detects_disagreement():
    agree = dict(train_loss=[0.5, 0.4, 0.45, 0.42, 0.47], test_acc=[0.9], test_loss=[0.3])
    from fused_resnet.cli.train import verdict

    assert verdict(agree, dict(agree), n_test=200, steps_per_epoch=5)["status"] == "AGREE"
    broken = dict(train_loss=[2.3, 2.3, 2.31, 2.29, 2.3], test_acc=[0.1], test_loss=[2.3])  # learns nothing
    v = verdict(agree, broken, n_test=200, steps_per_epoch=5)
    assert v["status"] == "DISAGREE" and v["exit_code"] == 1
    assert v["final_test_acc"]["status"] == v["last_epoch_train_loss"]["status"] == "DISAGREE"


def _image_folder(root, classes=("cat", "dog"), per_class=6, size=(20, 14)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for label, c in enumerate(classes):
        os.makedirs(root / c)
        for i in range(per_class):
            pixels = (torch.rand(size[1], size[0], 3, generator=g) * 120 + 100 * label).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / c / f"{i}.png")


@needs_matplotlib
def test_train_image_folder(tmp_path, capsys):
    data = tmp_path / "data"
    _image_folder(data)
    out = tmp_path / "out"
    rc = main(["train", "--device", "cpu", "--data", str(data), "--epochs", "1", "--batch", "4", "--size", "16", "--test-fraction",
               "0.25", "--out", str(out), "--quiet"])
    # 3 test images and 2 steps an epoch: too little for either comparison to mean anything.
    assert rc == 3, capsys.readouterr()
    doc = _doc(out / "train.json", "train")
    assert doc["dataset"]["classes"] == ["cat", "dog"]
    assert doc["dataset"]["train_images"] == 9 and doc["dataset"]["test_images"] == 3
    assert doc["verdict"]["status"] == "INCONCLUSIVE"


def test_check(tmp_path, capsys):
    rc = main(["check", "--device", "cpu", "--backends", "cpu,eager", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = _doc(tmp_path / "check.json", "check")
    assert doc["ok"] is True
    kinds = {(r["backend"], r["kind"], r["dtype"]) for r in doc["results"]}
    assert {("cpu", "op", "fp32"), ("cpu", "op", "bf16"), ("cpu", "model", "fp64"), ("eager", "op", "fp32")} <= kinds
    assert all(r["ok"] for r in doc["results"])
    assert "all checks passed" in out and assert_tables_well_formed(out) == 1


def test_check_reports_a_wrong_backend(tmp_path, capsys, monkeypatch):
    """The check can fail: a backend whose output is off by 1e-3 is caught (exit code 1, the case named)."""
    import fused_resnet.cli.check as check

    real = check.batch_norm_act

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) * (1 + 1e-3)

    monkeypatch.setattr(check, "batch_norm_act", off_by_a_little)
    rc = main(["check", "--device", "cpu", "--backends", "cpu", "--no-model", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and "SOME CHECKS FAILED" in out
    doc = json.loads((tmp_path / "check.json").read_text())
    assert doc["ok"] is False and any(not r["ok"] and r["worst"] == "out" for r in doc["results"])


# ---------------------------------------------------------------------------------------------------------
# User errors: one line on stderr, exit code 2, no traceback, nothing written


def test_bench_measures_convolution_settings_side_by_side(tmp_path, capsys):
    """fused-<backend>:conv=<setting>: each convolution implementation (and the measured selection) as its
    own variant of one interleaved run, each with its own parity check, and what ran counted per call."""
    rc = main(["bench", "--device", "cpu", "--arch", "resnet18", "--batch", "2", "--size", "32", "--steps", "1",
               "--warmup", "0", "--no-inference", "--variants", "eager,fused-cpu:conv=aten,fused-cpu:conv=gemm",
               "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = _doc(tmp_path / "bench.json", "bench")
    by = {r["variant"]: r for r in doc["results"]}
    assert by["eager"]["conv"] is None and not by["eager"]["conv_calls"]
    # ResNet-18 has 20 convolutions; forced "gemm" runs where conv_gemm applies (the small maps), ATen elsewhere.
    assert by["fused-cpu:conv=aten"]["conv_calls"] == {"aten": 20}
    gemm = by["fused-cpu:conv=gemm"]["conv_calls"]
    assert sum(gemm.values()) == 20 and gemm.get("gemm", 0) > 0
    assert [(p["backend"], p["conv"]) for p in doc["parity"]] == [("cpu", "aten"), ("cpu", "gemm")]
    assert all(p["ok"] for p in doc["parity"])
    assert "fused[cpu:conv=gemm]" in out and "fused-cpu:conv=aten: aten 20" in out
    assert dispatch._conv_override is None, "the settings hold during their own variant's steps only"


@pytest.mark.parametrize("argv, message", [
    (["bench", "--arch", "resnet9000"], "invalid choice: 'resnet9000'"),
    (["bench", "--variants", "eager,fused-cpu:conv=winograd"], "unknown variant(s) fused-cpu:conv=winograd"),
    (["bench", "--variants", "eager:conv=aten"], "applies to the fused variants only"),
    (["bench", "--batch", "0"], "must be >= 1"),
    (["bench", "--batch", "two"], "expected a positive integer"),
    (["bench", "--batch", "1"], "--batch must be >= 2"),
    (["bench", "--dtype", "fp16", "--device", "cpu"], "fp16 is not supported on CPU"),
    (["bench", "--device", "cuda"] if not torch.cuda.is_available() else ["bench", "--device", "tpu"],
     "CUDA is not available" if not torch.cuda.is_available() else "unknown device"),
    (["bench", "--variants", "eager,warp-speed"], "unknown variant(s) warp-speed"),
    (["bench", "--variants", "fused-cuda"] if not torch.cuda.is_available() else ["bench", "--variants", "fused-cpu"],
     "variant 'fused-"),
    (["micro", "--providers", "magic"], "unknown provider(s) magic"),
    (["micro", "--shapes", "layer9"], "matches no shape"),
    (["memory", "--backend", "cuda"] if not torch.cuda.is_available() else ["memory", "--backend", "cpu"],
     "backend"),
    (["train", "--data", "/nonexistent/images"], "no such folder"),
    (["train", "--test-fraction", "1.5"], "--test-fraction must be between 0 and 1"),
    (["check", "--backends", "cobol"], "unknown backend(s) cobol"),
])
def test_user_errors(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    try:
        rc = main([*argv, "--out", str(out), "--quiet"])
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists() or not os.listdir(out)


def test_empty_image_folder_is_a_user_error(tmp_path, capsys):
    (tmp_path / "data" / "only_class").mkdir(parents=True)
    rc = main(["train", "--device", "cpu", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and "at least 2 class folders" in capsys.readouterr().err


def test_unreadable_image_is_a_user_error(tmp_path, capsys):
    data = tmp_path / "data"
    _image_folder(data, per_class=2)
    (data / "cat" / "broken.png").write_bytes(b"not a png")
    rc = main(["train", "--device", "cpu", "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and "cannot read image" in capsys.readouterr().err


def test_ctrl_c_leaves_no_result_files(tmp_path, capsys, monkeypatch):
    """Interrupted mid-measurement (the second variant's first step): exit code 130, the earlier results
    untouched, nothing staged left."""
    from fused_resnet.benchmarking import e2e

    (tmp_path / "bench.json").write_text('{"earlier": "run"}')
    real, calls = e2e._Variant.train_step, []

    def interrupted(self):
        calls.append(self.variant)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(e2e._Variant, "train_step", interrupted)
    rc = main(["bench", "--device", "cpu", "--arch", "resnet18", "--batch", "2", "--size", "32", "--steps", "1", "--warmup", "0",
               "--no-parity", "--out", str(tmp_path), "--quiet"])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert calls == ["eager", "fused"]
    assert sorted(os.listdir(tmp_path)) == ["bench.json"]
    assert json.loads((tmp_path / "bench.json").read_text()) == {"earlier": "run"}


def test_entry_points():
    """`python -m fused_resnet` and the `fused-resnet` console script reach the same parser."""
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("fused-resnet") == "fused_resnet.cli:main"
    result = subprocess.run([sys.executable, "-m", "fused_resnet", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0
    for command in ("bench", "micro", "memory", "train", "check", "info"):
        assert command in result.stdout
    bad = subprocess.run([sys.executable, "-m", "fused_resnet", "bench", "--batch", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "must be >= 1" in bad.stderr
