"""Measurements a user can trust: the statistics every timed figure carries, the timers, provenance, the tables
every subcommand prints, the train verdict's INCONCLUSIVE case, the charts' shared colours and stage axis, and
the stage markers of the allocator timeline. Nothing here asserts a speed."""
from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import torch

from fused_resnet.benchmarking import memory, report, stats, timing
from fused_resnet.cli import main


# ---------------------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("n", [1, 2, 5, 20, 101])
def test_summary_matches_numpy(n):
    samples = (torch.rand(n, generator=torch.Generator().manual_seed(n)) * 10 + 1).tolist()
    s = stats.summarize(samples)
    q1, med, q3 = np.percentile(samples, [25, 50, 75])  # numpy's default: linear interpolation
    assert (s.n, s.median, s.q1, s.q3) == (n, pytest.approx(med), pytest.approx(q1), pytest.approx(q3))
    assert (s.min, s.max, s.mean) == (min(samples), max(samples), pytest.approx(float(np.mean(samples))))
    assert s.samples == samples  # time order kept
    d = s.to_dict()
    assert d["iqr_pct"] == pytest.approx(100 * (q3 - q1) / med) and d["noisy"] == (d["iqr_pct"] > 10)
    assert stats.from_dict(d).median == s.median


def test_noisy_flag_and_warning_name_the_figure():
    quiet = stats.summarize([10.0, 10.1, 9.9, 10.05, 9.95])
    loud = stats.summarize([10.0, 14.0, 8.0, 16.0, 9.0])
    assert not quiet.noisy and loud.noisy
    assert stats.noise_warning("fused", [("training step", quiet, "ms")], "remedy") is None
    line = stats.noise_warning("fused", [("training step", quiet, "ms"), ("inference", loud, "ms")], "Use --steps.")
    assert line.startswith("warning: fused:") and "inference IQR" in line and "training step" not in line
    assert f"{100 * loud.rel_iqr:.0f}%" in line and "Use --steps." in line


def test_ratio_range_from_quartiles():
    g = torch.Generator().manual_seed(3)
    slow = stats.summarize((torch.rand(9, generator=g) + 2.0).tolist())
    fast = stats.summarize((torch.rand(9, generator=g) + 1.0).tolist())
    r = stats.ratio(slow, fast)  # the speed-up of "fast" over "slow"
    assert r["median"] == pytest.approx(slow.median / fast.median)
    assert r["low"] == pytest.approx(slow.q1 / fast.q3) and r["high"] == pytest.approx(slow.q3 / fast.q1)
    assert r["low"] <= r["median"] <= r["high"] and stats.ratio_is_decisive(r)
    same = stats.ratio(slow, slow)
    assert same["low"] < 1 < same["high"] and not stats.ratio_is_decisive(same)


def test_stored_samples_are_thinned_but_counted():
    s = stats.summarize(float(i) for i in range(3 * stats.MAX_STORED_SAMPLES))
    d = s.to_dict()
    assert d["n"] == 3 * stats.MAX_STORED_SAMPLES and len(d["samples"]) == stats.MAX_STORED_SAMPLES
    assert d["samples"] == sorted(d["samples"]) and d["samples"][0] == 0.0  # evenly spaced, in time order


# ---------------------------------------------------------------------------------------------------------
# Timers


def test_cpu_kernel_timer_samples_a_known_duration():
    """A 2 ms sleep: every sample is at least 2 ms (the timer does not under-count), and there are `rounds`."""
    s = timing.kernel_time(lambda: time.sleep(2e-3), torch.device("cpu"), rounds=4)
    assert s.n == 4 and s.min >= 2e-3 and s.median < 0.5


def test_cpu_kernel_timer_stops_slow_calls_at_the_minimum(monkeypatch):
    monkeypatch.setattr(timing, "CPU_MAX_TIME_S", 0.05)
    s = timing.kernel_time(lambda: time.sleep(0.03), torch.device("cpu"), rounds=50)
    assert s.n == timing.CPU_MIN_SAMPLES


def test_step_times_one_sample_per_step():
    calls = []
    s, peak = timing.step_times(lambda: calls.append(1), torch.device("cpu"), steps=7, warmup=2)
    assert len(calls) == 9 and s.n == 7 and math.isnan(peak)


def test_ceilings_carry_their_timing():
    cpu = torch.device("cpu")
    copy = timing.copy_bandwidth(cpu, nbytes=1 << 20, rounds=3, dtype=torch.float32)
    assert copy.work == 1 << 20 and copy.detail["tensor_bytes"] == 1 << 19 and copy.time.n == 3
    d = copy.to_dict()
    assert d["gb_per_s"] == pytest.approx(copy.work / (d["time_us"]["median"] * 1e-6) / 1e9)
    mm = timing.matmul_rate(cpu, n=64, dtype=torch.float32, rounds=3)
    assert mm.work == 2 * 64 ** 3 and mm.to_dict()["dtype"] == "fp32"


# ---------------------------------------------------------------------------------------------------------
# Provenance


def test_environment_provenance():
    env = report.environment(torch.device("cpu"))
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["triton_interpret"] == report.triton_interpreted()
    assert env["gpu_driver"] is None and env["gpu_clocks_mhz"] is None
    commit, dirty = env["git_commit"], env["git_dirty"]
    assert (commit is None and dirty is None) or (re.fullmatch(r"[0-9a-f]{40}", commit) and isinstance(dirty, bool))


def test_busy_machine_warning(monkeypatch):
    cores = __import__("os").cpu_count()
    monkeypatch.setattr(report.os, "getloadavg", lambda: (cores + 0.5, 0.0, 0.0))
    line = report.busy_machine_warning(torch.device("cpu"))
    assert line.startswith("warning: the machine is busy") and f"{cores + 0.5:.1f} on {cores} cores" in line
    assert report.environment(torch.device("cpu"))["load_avg_1m"] == cores + 0.5
    assert report.busy_machine_warning(torch.device("cuda")) is None  # GPU kernels: the host's load is not it
    monkeypatch.setattr(report.os, "getloadavg", lambda: (cores / 4, 0.0, 0.0))
    assert report.busy_machine_warning(torch.device("cpu")) is None


def test_nvidia_smi_is_parsed_and_never_fails(monkeypatch):
    """The row of the GPU whose PCI bus id is the device's (nvidia-smi's order need not be CUDA's)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0))
    monkeypatch.setattr(report, "_run", lambda cmd, cwd=None: ("00000000:1A:00.0, 570.12, 345, 2619, 1980, 2619\n"
                                                               "00000000:3B:00.0, 570.12, 1980, 2619, 1980, [N/A]\n"))
    got = report._nvidia_smi.__wrapped__(torch.device("cuda", 0))
    assert got == dict(gpu_driver="570.12", gpu_clocks_mhz=dict(sm=1980.0, mem=2619.0, max_sm=1980.0, max_mem=None))
    monkeypatch.setattr(report, "_run", lambda cmd, cwd=None: None)  # no nvidia-smi
    assert report._nvidia_smi.__wrapped__(torch.device("cuda", 0)) == {}


def test_result_document_requires_a_list_of_records():
    cpu = torch.device("cpu")
    with pytest.raises(TypeError):
        report.result_document("x", [], cpu, {}, {"eager": {}})
    doc = report.result_document("x", [], cpu, {}, [dict(interpreted=False), dict(interpreted=True)])
    assert doc["schema"] == "fused_resnet.x/2" and doc["interpreted"] is True


# ---------------------------------------------------------------------------------------------------------
# Tables


def _cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    return re.split(r"(?<!\\)\|", line[1:-1])


def assert_tables_well_formed(text: str) -> int:
    """Every Markdown table in ``text``: a header, a separator with as many cells, and rows with as many.
    Returns the number of tables."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            blocks.append(current)
            current = []
    for block in blocks:
        assert len(block) >= 3, block
        header, sep, *rows = block
        n = len(_cells(header))
        assert re.fullmatch(r"\|(-+\|)+", sep) and len(_cells(sep)) == n, (header, sep)
        for row in rows:
            assert len(_cells(row)) == n, (header, row)
    return len(blocks)


def test_format_table_counts_and_escapes():
    text = report.format_table(["a", "b|c", "d"], [[1.5, "x|y", None], [float("nan"), 1234.0, "z"]])
    assert assert_tables_well_formed(text) == 1 and "x\\|y" in text
    with pytest.raises(ValueError):
        report.format_table(["a", "b"], [[1, 2, 3]])


# Every subcommand's printed tables are checked with assert_tables_well_formed where tests/test_cli.py runs it.


def test_micro_names_its_columns(tmp_path, capsys):
    main(["micro", "--device", "cpu", "--smoke", "--shapes", "layer4.bn3", "--rounds", "2", "--no-kernels",
          "--providers", "cpu,eager", "--out", str(tmp_path), "--quiet"])
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| shape"))
    assert "speed-up vs eager" in header and "cpu/eager" not in header and "% of same-size copy" in header


@pytest.mark.skipif(not report.triton_interpreted(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py, no CUDA)")
def test_interpreted_results_say_so_loudly(tmp_path, capsys):
    import json

    rc = main(["micro", "--device", "cpu", "--smoke", "--shapes", "layer4.bn3", "--rounds", "2", "--no-kernels",
               "--providers", "triton,eager", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and report.INTERPRETER_BANNER in out
    doc = json.loads((tmp_path / "micro.json").read_text())
    assert doc["interpreted"] is True
    assert {r["provider"]: r["interpreted"] for r in doc["results"]} == {"triton": True, "eager": False}


# ---------------------------------------------------------------------------------------------------------
# The train verdict


def _history(losses, acc):
    return dict(train_loss=list(losses), test_acc=[acc], test_loss=[1.0])


def test_verdict_is_inconclusive_on_a_small_test_set():
    from fused_resnet.cli.train import MAX_ACC_BOUND, accuracy_bound, verdict

    g = torch.Generator().manual_seed(0)
    losses = (torch.rand(8, generator=g) + 0.5).tolist()
    # 24 test images: the allowance is ~40 points, so even a 20-point difference cannot be told from noise.
    v = verdict(_history(losses, 0.70), _history(losses, 0.50), n_test=24, steps_per_epoch=8)
    acc = v["final_test_acc"]
    assert v["status"] == "INCONCLUSIVE" and v["exit_code"] == 3 and not v["ok"]
    assert acc["status"] == "INCONCLUSIVE" and acc["bound"] > MAX_ACC_BOUND
    n = acc["test_images_needed"]
    assert accuracy_bound(0.6, n) <= MAX_ACC_BOUND < accuracy_bound(0.6, n - 1)
    assert acc["test_images_needed_worst_case"] >= n and f"about {n} test images" in v["reasons"][0]
    # The same difference on enough images is conclusive either way.
    assert verdict(_history(losses, 0.70), _history(losses, 0.50), n_test=n, steps_per_epoch=8)["status"] == "DISAGREE"
    assert verdict(_history(losses, 0.6), _history(losses, 0.6), n_test=n, steps_per_epoch=8)["status"] == "AGREE"


def test_verdict_too_few_loss_steps_is_inconclusive_but_a_clear_failure_is_not():
    from fused_resnet.cli.train import verdict

    same = _history([0.6, 0.5], 0.9)
    v = verdict(same, dict(same, train_loss=[2.37, 2.4]), n_test=1000, steps_per_epoch=2)
    assert v["last_epoch_train_loss"]["status"] == "INCONCLUSIVE" and v["status"] == "INCONCLUSIVE"
    assert "2 training step(s)" in v["reasons"][0]
    # A difference beyond even a wide allowance is a disagreement, however small the test set.
    broken = verdict(_history([0.5] * 6, 1.0), _history([0.5] * 6, 0.0), n_test=30, steps_per_epoch=6)
    assert broken["final_test_acc"]["status"] == "DISAGREE" and broken["status"] == "DISAGREE"
    assert broken["exit_code"] == 1


def test_train_on_a_tiny_dataset_exits_inconclusive(tmp_path, capsys):
    """The issue's case: a 24-image folder cannot give AGREE. Exit code 3, the reason and the number of test
    images needed on the terminal and in train.json."""
    import json

    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for label, c in enumerate(("cat", "dog")):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(12):
            pixels = (torch.rand(12, 12, 3, generator=g) * 120 + 100 * label).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / "data" / c / f"{i}.png")
    rc = main(["train", "--device", "cpu", "--data", str(tmp_path / "data"), "--epochs", "1", "--batch", "9",
               "--size", "16", "--test-fraction", "0.25", "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 3, out
    v = json.loads((tmp_path / "out" / "train.json").read_text())["verdict"]
    assert v["status"] == "INCONCLUSIVE" and v["exit_code"] == 3
    assert v["final_test_acc"]["test_images"] == 6 and v["last_epoch_train_loss"]["steps"] == 2
    assert "parity verdict: INCONCLUSIVE" in out and f"about {v['final_test_acc']['test_images_needed']} test" in out
    assert assert_tables_well_formed(out) == 1


def test_train_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "INCONCLUSIVE" in text and "exit code 3" in text


# ---------------------------------------------------------------------------------------------------------
# Charts and timelines


def test_one_colour_per_variant():
    from fused_resnet.cli import plots

    names = list(plots.PALETTE)
    assert len({plots.color(n) for n in names}) == len(names)
    assert plots.color("cpu") == plots.color("fused-cpu") and plots.color("triton") == plots.color("fused-triton")
    assert plots.color("something-new") == plots.color("something-new")


def test_stage_positions_align_variants_by_stage():
    from fused_resnet.cli import plots

    stages = ["stem", "layer1", "layer2"]
    a = plots.stage_positions(10, {"stem": 0, "layer1": 4, "layer2": 6}, stages)
    b = plots.stage_positions(5, {"stem": 0, "layer1": 1, "layer2": 3}, stages)
    assert a[4] == b[1] == 1.0 and a[6] == b[3] == 2.0  # each stage starts at the same x in both
    assert a == sorted(a) and all(0 <= x < 3 for x in a + b)
    c = plots.stage_positions(4, {"stem": 0, "layer2": 2}, stages)  # layer1 saved nothing: zero width
    assert c[2] == 2.0


def test_allocator_timeline_finds_the_stage_markers():
    m = memory.MARKER_SIZES
    events = [dict(action="alloc", size=1024), dict(action="alloc", size=m["layer1"]),
              dict(action="free_requested", size=m["layer1"]), dict(action="free_completed", size=m["layer1"]),
              dict(action="alloc", size=2048), dict(action="alloc", size=m["backward"]),
              dict(action="free_completed", size=m["backward"]), dict(action="free_completed", size=1024),
              dict(action="segment_alloc", size=1 << 21)]
    timeline, starts = memory.timeline_from_trace(events, 100, m)
    assert timeline == [1124, 3172, 2148]  # the markers are not part of the timeline
    assert starts == {"stem": 0, "layer1": 1, "backward": 2}
    assert len(set(m.values())) == len(m) and all(v % 512 == 0 for v in m.values())


def test_downsample_moves_the_stage_starts_with_the_points():
    series = [float(i) for i in range(100)]
    points, starts = memory.downsample(series, {"stem": 0, "layer1": 50, "head": 99}, n=10)
    assert len(points) == 10 and points[0] == 9.0 and starts == {"stem": 0, "layer1": 5, "head": 9}


def test_interleaved_rounds_rotate_and_pair_the_samples():
    """e2e's interleaving: every round runs each variant once, the first one rotates, and sample k of every
    variant comes from round k, so a speed-up taken per round cancels a load change between rounds."""
    from fused_resnet.benchmarking import e2e

    order = []
    fns = [lambda i=i: order.append(i) for i in range(3)]
    times, peaks = e2e._interleaved(fns, torch.device("cpu"), steps=4, warmup=1, resident=[lambda: 0] * 3,
                                    on_step=None)
    assert order[:3] == [0, 1, 2]  # warm-up round
    rounds = [order[3 + 3 * k: 6 + 3 * k] for k in range(4)]
    assert [r[0] for r in rounds] == [0, 1, 2, 0] and all(sorted(r) == [0, 1, 2] for r in rounds)
    assert [len(t) for t in times] == [4, 4, 4] and all(math.isnan(p) for p in peaks)
    # a machine getting 2x slower every round: both variants' samples drift alike, the per-round ratio does not
    base, mine = [1.0, 2.0, 4.0, 8.0], [0.5, 1.0, 2.0, 4.0]
    paired = stats.paired_ratio(base, mine)
    assert paired["median"] == paired["low"] == paired["high"] == 2.0 and paired["paired_rounds"] == 4
    unpaired = stats.ratio(stats.summarize(base), stats.summarize(mine))
    assert unpaired["low"] < 1.0 < unpaired["high"]  # what separate summaries would have said: undecided
