"""The command line's habits (fused_resnet/cli): timm's and torchvision's flag spellings, unknown arguments
reported by the subcommand's parser with a suggestion, every user error as one line on stderr with exit code 2
and nothing written to --out (out of memory, a closed stdout, an invalid FUSED_RESNET_BACKEND, a --data
folder too large for memory, weights= naming no file), SIGTERM cleaning up like Ctrl-C, `fused-resnet info`,
and the quieter model build (conversion report at DEBUG, one warning when automatic selection lands on eager
on CUDA, the resolved backend in reprs and build_info). Runs pin --device cpu; nothing is measured."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import fused_resnet
from fused_resnet import backends
from fused_resnet.cli import build_parser, common, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fast bench run (one eager training step of a tiny ResNet-18) for the tests that only need a run.
QUICK_BENCH = ["bench", "--device", "cpu", "--arch", "resnet18", "--batch", "2", "--size", "32", "--steps", "1",
               "--warmup", "0", "--variants", "eager", "--no-parity", "--no-inference", "--quiet"]


def _run(argv):
    """main(argv), with argparse's SystemExit turned into its exit code."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _one_line_error(captured, rc, command, code=2):
    lines = captured.err.strip().splitlines()
    assert rc == code, captured
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"fused-resnet {command}: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def _nothing_written(out):
    assert not os.path.exists(out) or not os.listdir(out), os.listdir(out)


def _subprocess_env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", **extra)
    return env


# ---------------------------------------------------------------------------------------------------------
# Flag spellings from timm and torchvision


ALIASES = {  # subcommand: the aliases that apply (the subcommand has the underlying option)
    "bench": ("batch", "model", "img-size", "amp", "channels-last"),
    "micro": ("batch",),
    "memory": ("batch", "model", "img-size", "amp", "channels-last"),
    "train": ("batch", "model", "img-size", "amp"),
}


@pytest.mark.parametrize("command", list(ALIASES))
def test_aliases_write_the_same_options(command):
    rng = random.Random(command)
    parser = build_parser()
    have = ALIASES[command]
    batch, size = rng.randint(2, 999), rng.randint(32, 512)
    arch = rng.choice(["resnet34", "resnet101", "wide_resnet50_2"])
    if "batch" in have:
        for spelling in (["-b", str(batch)], [f"-b{batch}"], ["--batch-size", str(batch)], ["--batch", str(batch)],
                         [f"--batch-size={batch}"]):
            assert parser.parse_args([command, *spelling]).batch == batch, spelling
    if "model" in have:
        assert parser.parse_args([command, "--model", arch]).arch == arch
        assert parser.parse_args([command, "--arch", arch]).arch == arch
    if "img-size" in have:
        assert parser.parse_args([command, "--img-size", str(size)]).size == size
    if "amp" in have:
        assert parser.parse_args([command, "--amp"]).amp is True
        assert parser.parse_args([command]).amp is False
    if "channels-last" in have:
        assert parser.parse_args([command, "--channels-last"]).memory_format == "channels_last"
        assert parser.parse_args([command, "--memory-format", "contiguous"]).memory_format == "contiguous"


@pytest.mark.parametrize("command, flag", [("micro", "--model"), ("micro", "--img-size"), ("micro", "--amp"),
                                           ("train", "--channels-last"), ("check", "-b")])
def test_aliases_only_where_the_option_exists(command, flag, capsys):
    rc = _run([command, flag, *(["2"] if flag in ("-b", "--img-size") else ["resnet18"] if flag == "--model" else [])])
    _one_line_error(capsys.readouterr(), rc, command)


def test_abbreviation_of_an_aliased_option_is_not_ambiguous():
    """--bat matches --batch and --batch-size, which are one option: accepted, as before the alias existed."""
    assert build_parser().parse_args(["bench", "--bat", "6"]).batch == 6


def test_channels_last_conflicts_with_memory_format_contiguous(capsys):
    rc = _run(["bench", "--memory-format", "contiguous", "--channels-last"])
    line = _one_line_error(capsys.readouterr(), rc, "bench")
    assert "not allowed with" in line


def test_amp_resolves_per_device_and_conflicts_with_another_dtype(monkeypatch):
    parser = build_parser()
    args = parser.parse_args(["train", "--device", "cpu", "--amp"])
    common.finish_arguments(args)
    assert args.dtype == "bf16"  # CPU autocast's half type
    args = parser.parse_args(["bench", "--device", "cpu", "--amp", "--dtype", "bf16"])
    common.finish_arguments(args)
    assert args.dtype == "bf16"  # consistent: fine
    with pytest.raises(common.CLIError, match="--amp means bf16 .* contradicts --dtype fp32"):
        common.finish_arguments(parser.parse_args(["memory", "--device", "cpu", "--amp", "--dtype", "fp32"]))
    # Without either, each subcommand keeps its own default (train fp32; bench and memory choose per device).
    for command, default in (("train", "fp32"), ("bench", None), ("memory", None)):
        args = parser.parse_args([command])
        common.finish_arguments(args)
        assert args.dtype == default, command
    # On CUDA: bf16 where the device has it, fp16 elsewhere.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert common.amp_dtype(torch.device("cuda")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert common.amp_dtype(torch.device("cuda")) == "bf16"


def test_a_run_with_timm_spellings(tmp_path, capsys, monkeypatch):
    """The aliases reach the run: the configuration bench measures (and records in its JSON) is what they
    asked for. The measurement itself is stopped at its start (Ctrl-C), which keeps this test fast."""
    from fused_resnet.benchmarking import e2e

    seen = []

    def record(variants, cfg, device, **kwargs):
        seen.append(e2e.config_dict(cfg))
        raise KeyboardInterrupt

    monkeypatch.setattr(e2e, "measure_all", record)
    batch = random.Random(7).randint(2, 64)
    rc = main(["bench", "--device", "cpu", "--model", "resnet34", "-b", str(batch), "--img-size", "40", "--amp",
               "--channels-last", "--variants", "eager", "--no-parity", "--out", str(tmp_path), "--quiet"])
    assert rc == 130, capsys.readouterr()
    assert [(c["arch"], c["batch"], c["size"], c["dtype"], c["channels_last"]) for c in seen] == \
        [("resnet34", batch, 40, "bf16", True)]


# ---------------------------------------------------------------------------------------------------------
# Unknown arguments: the subcommand's parser, one line, the closest option


@pytest.mark.parametrize("argv, suggestion", [
    (["bench", "--bach", "4"], "--batch"),
    (["micro", "--rouns", "3"], "--rounds"),
    (["memory", "--memory_format", "contiguous"], "--memory-format"),
    (["train", "--epoches", "3"], "--epochs"),
    (["train", "--data-dir", "x"], "--data"),
    (["check", "--bakends", "cpu"], "--backends"),
    (["info", "--jsn"], "--json"),
    (["bench", "--zzzzzz"], None),
])
def test_unknown_arguments_reported_by_the_subcommand(argv, suggestion, capsys):
    rc = _run(argv)
    line = _one_line_error(capsys.readouterr(), rc, argv[0])
    assert line.startswith(f"fused-resnet {argv[0]}: error: unrecognized arguments: {' '.join(argv[1:])}"), line
    if suggestion:
        assert f"did you mean {suggestion}?" in line, line
    else:
        assert "did you mean" not in line, line


def test_misspelt_subcommand_and_choice(capsys):
    rc = _run(["bnech"])
    line = capsys.readouterr().err.strip()
    assert rc == 2 and len(line.splitlines()) == 1 and "did you mean bench?" in line, line
    rc = _run(["memory", "--backend", "cpx"])
    line = _one_line_error(capsys.readouterr(), rc, "memory")
    assert "invalid choice: 'cpx'" in line and "did you mean cpu?" in line, line


# ---------------------------------------------------------------------------------------------------------
# User errors: one line, exit code 2, nothing written to --out


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "1.05 GiB is free. Of the allocated memory 75.12 GiB is allocated by PyTorch")
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError(CUDA_OOM), RuntimeError(CPU_OOM), MemoryError()],
                         ids=["cuda-oom", "cpu-allocator", "MemoryError"])
def test_out_of_memory_names_a_batch_that_fits(tmp_path, capsys, monkeypatch, error):
    from fused_resnet.benchmarking import e2e

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(e2e, "measure_all", out_of_memory)
    batch = random.Random(str(error)).randint(64, 512)
    out = tmp_path / "out"
    argv = [*QUICK_BENCH, "--batch", str(batch), "--out", str(out)]
    rc = _run(argv)
    line = _one_line_error(capsys.readouterr(), rc, "bench")
    assert "out of memory" in line and f"at --batch {batch}" in line, line
    suggested = re.search(r"--batch (\d+) should fit", line)
    assert suggested and 1 <= int(suggested.group(1)) < batch, line
    _nothing_written(out)


def test_out_of_memory_raised_through_another_error(tmp_path, capsys, monkeypatch):
    """torch.compile wraps the errors of what it compiles: the allocation failure is found behind them."""
    from fused_resnet.benchmarking import e2e

    def wrapped(*args, **kwargs):
        try:
            raise torch.OutOfMemoryError(CUDA_OOM)
        except torch.OutOfMemoryError as exc:
            raise RuntimeError("backend compiler failed") from exc

    monkeypatch.setattr(e2e, "measure_all", wrapped)
    rc = _run([*QUICK_BENCH, "--batch", "64", "--out", str(tmp_path / "out")])
    line = _one_line_error(capsys.readouterr(), rc, "bench")
    assert "out of memory" in line and re.search(r"--batch \d+ should fit", line), line
    _nothing_written(tmp_path / "out")


def test_a_runtime_error_that_is_not_out_of_memory_is_not_hidden(tmp_path, monkeypatch):
    """A bug stays a traceback (the one-line treatment is for the user's mistakes and the machine's limits)."""
    from fused_resnet.benchmarking import e2e

    def bug(*args, **kwargs):
        raise RuntimeError("an internal error")

    monkeypatch.setattr(e2e, "measure_all", bug)
    with pytest.raises(RuntimeError, match="an internal error"):
        main([*QUICK_BENCH, "--out", str(tmp_path / "out")])
    _nothing_written(tmp_path / "out")


def test_batch_that_fits_is_an_honest_upper_estimate():
    rng = random.Random(0)
    for _ in range(200):
        batch = rng.randint(2, 2048)
        usable = rng.uniform(1, 200) * 2**30
        need = usable * rng.uniform(1.0, 20.0)  # it failed: it needed more than what was usable
        fit = common.batch_that_fits(batch, need, usable)
        assert 0 <= fit < batch
        assert fit * need / batch <= 0.9 * usable + 1  # memory in proportion to the batch fits in 90%
        if fit >= 16:
            assert fit % 8 == 0
    # When the arithmetic says the failed batch fits (fragmentation, another process), it halves.
    assert common.batch_that_fits(256, need=10 * 2**30, usable=80 * 2**30) == 128


def test_cuda_out_of_memory_message_uses_the_device_figures(monkeypatch):
    """The CUDA estimate from torch.cuda's figures (mocked: the arithmetic, not a GPU, is under test)."""
    rng = random.Random(1)
    total = rng.uniform(20, 140) * 2**30
    reserved = total * rng.uniform(0.6, 0.8)
    free = total * rng.uniform(0.01, 0.1)
    peak = reserved * rng.uniform(0.8, 0.99)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), int(total)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: int(peak))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mock GPU")
    batch = rng.randint(64, 512)
    line = common.out_of_memory_message(torch.OutOfMemoryError(CUDA_OOM), "cuda", batch)
    # usable = what other processes do not hold = this process's cache + what is free
    expected = common.batch_that_fits(batch, int(peak) + 2 * 2**30, int(free) + int(reserved))
    assert f"--batch {expected} should fit" in line and "Mock GPU" in line, line
    assert "\n" not in line


@pytest.mark.parametrize("command, extra", [
    ("bench", []), ("micro", ["--smoke"]), ("memory", []), ("train", []), ("check", []),
])
def test_invalid_backend_environment_every_subcommand(tmp_path, capsys, monkeypatch, command, extra):
    monkeypatch.setattr(backends, "_env_error", "FUSED_RESNET_BACKEND='warp' is not one of auto, triton, cuda, "
                                                "cpu, eager")
    out = tmp_path / "out"
    rc = _run([command, "--device", "cpu", *extra, "--out", str(out), "--quiet"])
    line = _one_line_error(capsys.readouterr(), rc, command)
    assert "FUSED_RESNET_BACKEND='warp'" in line
    _nothing_written(out)


def test_invalid_backend_environment_info_reports_then_fails(capsys, monkeypatch):
    """`info` is where one looks when something is wrong: it shows everything, then the one-line error."""
    monkeypatch.setattr(backends, "_env_error", "FUSED_RESNET_BACKEND='warp' is not one of auto, triton, cuda, "
                                                "cpu, eager")
    rc = main(["info"])
    captured = capsys.readouterr()
    line = _one_line_error(captured, rc, "info")
    assert "FUSED_RESNET_BACKEND='warp'" in line
    assert "INVALID: FUSED_RESNET_BACKEND='warp'" in captured.out and "versions:" in captured.out


def test_invalid_backend_environment_real_process(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "fused_resnet", *QUICK_BENCH, "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=_subprocess_env(FUSED_RESNET_BACKEND="warp-drive"))
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        "fused-resnet bench: error: FUSED_RESNET_BACKEND='warp-drive' is not one of auto, triton, cuda, cpu, eager"]
    _nothing_written(out)


class _ClosedPipe:
    """sys.stdout whose reader has gone: every write fails as on a pipe closed at the other end."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass

    def isatty(self):
        return False


def test_closed_stdout_in_process_writes_no_result(tmp_path, capsys, monkeypatch):
    """`fused-resnet check | head` with the reader gone before the report is printed: one line on stderr,
    exit code 2, the result file not written. (check on one small case, to be fast.)"""
    import fused_resnet.cli.check as check

    monkeypatch.setattr(check, "OP_CASES", check.OP_CASES[:1])
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    out = tmp_path / "out"
    rc = main(["check", "--device", "cpu", "--backends", "eager", "--no-model", "--out", str(out), "--quiet"])
    line = _one_line_error(capsys.readouterr(), rc, "check")
    assert "standard output was closed" in line and "no result files were written" in line, line
    _nothing_written(out)


def test_closed_stdout_real_process():
    """The same in a real process whose stdout is a pipe closed before the first write (with `| head` that is a
    race). Block-buffered, as stdout on a pipe is by default: the write fails at the flush."""
    env = _subprocess_env()
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.Popen([sys.executable, "-m", "fused_resnet", "info"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    rc = proc.wait(timeout=300)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fused-resnet info: error: standard output was closed"), err


def _image_folder(root, n_per_class=(5, 4), size=(18, 12)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for label, n in enumerate(n_per_class):
        os.makedirs(root / f"class{label}")
        for i in range(n):
            pixels = (torch.rand(size[1], size[0], 3, generator=g) * 200 + 20 * label).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"class{label}" / f"{i}.png")


def test_data_folder_too_large_for_memory(tmp_path, capsys, monkeypatch):
    pytest.importorskip("PIL")
    from fused_resnet.cli import data

    folder = tmp_path / "data"
    _image_folder(folder)
    n, size = 9, 64
    per_copy = n * 3 * size * size * 4
    # Memory for a little less than the whole folder: refused before any image is decoded.
    available = int(data.TRAINING_COPIES * per_copy / data.HEADROOM * random.Random(2).uniform(0.5, 0.95))
    monkeypatch.setattr(common, "available_memory", lambda: available)
    out = tmp_path / "out"
    rc = _run(["train", "--device", "cpu", "--data", str(folder), "--size", str(size), "--out", str(out), "--quiet"])
    line = _one_line_error(capsys.readouterr(), rc, "train")
    assert f"{n:,} images at {size}x{size}" in line, line
    _nothing_written(out)
    # The hints are right: the --limit and the --size named fit, one more image or pixel does not.
    limit = int(re.search(r"--limit (\d+)", line).group(1))
    fits = int(re.search(r"--size (\d+)", line).group(1))
    data.check_fits(str(folder), limit, size)
    data.check_fits(str(folder), n, fits)
    with pytest.raises(common.CLIError):
        data.check_fits(str(folder), limit + 1, size)
    with pytest.raises(common.CLIError):
        data.check_fits(str(folder), n, fits + 1)


def test_limit_picks_the_subset_before_decoding(tmp_path, monkeypatch):
    """--limit decodes only the images it keeps, and keeps the same ones as subsetting the whole folder."""
    pytest.importorskip("PIL")
    from PIL import Image

    from fused_resnet.cli import data

    folder = tmp_path / "data"
    _image_folder(folder)
    whole = data.load_image_folder(str(folder), 16)
    keep = torch.randperm(9, generator=torch.Generator().manual_seed(5))[:4]
    opened, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    part = data.load(str(folder), 16, limit=4, seed=5)
    assert len(opened) == 4
    assert torch.equal(part.images, whole.images[keep]) and torch.equal(part.labels, whole.labels[keep])


def test_available_memory_is_plausible():
    available = common.available_memory()
    assert available is None or 0 < available <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_weights_path_that_does_not_exist(tmp_path):
    import pathlib

    for missing in (str(tmp_path / "no" / "resnet18.pth"), tmp_path / "gone.pt", "checkpoint_that_is_not_here.pth"):
        with pytest.raises(FileNotFoundError, match=re.escape(os.fspath(missing))):
            fused_resnet.resnet18(weights=missing, num_classes=3)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        fused_resnet.resnet18(weights=pathlib.Path(tmp_path), num_classes=3)


# ---------------------------------------------------------------------------------------------------------
# SIGTERM: the same clean-up as Ctrl-C


def test_sigterm_in_process_cleans_up_and_restores_the_handler(tmp_path, capsys, monkeypatch):
    from fused_resnet.benchmarking import e2e

    (tmp_path / "bench.json").write_text('{"earlier": "run"}')
    real = e2e.measure_all

    def terminated_mid_run(*args, **kwargs):
        assert [p for p in os.listdir(tmp_path) if p.startswith(".staging-")]  # mid-run: something is staged
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(e2e, "measure_all", terminated_mid_run)
    before = signal.getsignal(signal.SIGTERM)
    rc = main([*QUICK_BENCH, "--out", str(tmp_path)])
    line = _one_line_error(capsys.readouterr(), rc, "bench", code=143)
    assert "terminated (SIGTERM); no result files were written" in line
    assert sorted(os.listdir(tmp_path)) == ["bench.json"]
    assert json.loads((tmp_path / "bench.json").read_text()) == {"earlier": "run"}
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_real_process_mid_run(tmp_path):
    """`timeout` / SLURM pre-emption: a running bench sent SIGTERM leaves no .staging-* folder, one line, 143."""
    out = tmp_path / "out"
    out.mkdir()
    argv = [*QUICK_BENCH, "--steps", "1000000", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "fused_resnet", *argv], cwd=ROOT, env=_subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not [p for p in os.listdir(out) if p.startswith(".staging-")]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.05)
        time.sleep(0.5)  # inside the timed steps
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["fused-resnet bench: terminated (SIGTERM); no result files were written"]
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------------------
# fused-resnet info


def test_info_report(capsys):
    rc = main(["info"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"torch         {torch.__version__}" in out and f"fused_resnet  {fused_resnet.__version__}" in out
    for device_type in ("cpu", "cuda"):
        section = out.split(f"backends for {device_type} tensors")[1].split("\n\n")[0]
        for b in backends.BACKENDS:
            ok, reason = backends.backend_status(b, device_type)
            assert re.search(rf"^  {b} +{'available' if ok else re.escape('unavailable: ' + reason)}$", section,
                             re.M), (b, device_type, section)
    assert "device cpu:" in out and "FUSED_RESNET_BACKEND" in out and "TRITON_INTERPRET" in out


def test_info_json_matches_the_library():
    """`python -m fused_resnet info --json`: one JSON object agreeing with fused_resnet's own answers."""
    result = subprocess.run([sys.executable, "-m", "fused_resnet", "info", "--json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=_subprocess_env(FUSED_RESNET_BACKEND="eager"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["versions"]["torch"] == torch.__version__
    assert info["build"]["extension"] == backends.extension_loaded()
    for device_type in ("cpu", "cuda"):
        for b in backends.BACKENDS:
            ok, reason = backends.backend_status(b, device_type)
            assert info["backends"][device_type][b] == {"available": ok, "reason": reason}
    assert info["requested"] == "eager" and info["environment"]["FUSED_RESNET_BACKEND"] == "eager"
    assert info["resolved"]["cpu"] == "eager"
    assert [d["device"] for d in info["devices"]][0] == "cpu"
    assert len(info["devices"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)


# ---------------------------------------------------------------------------------------------------------
# Building a model: the report at DEBUG, the resolved backend shown, one warning for eager on CUDA


def test_conversion_report_is_logged_at_debug(caplog):
    with caplog.at_level(logging.INFO, logger="fused_resnet"):
        fused_resnet.resnet18(num_classes=3)
    assert not [r for r in caplog.records if r.name == "fused_resnet"]
    with caplog.at_level(logging.DEBUG, logger="fused_resnet"):
        model = fused_resnet.resnet18(num_classes=3)
    debug = [r for r in caplog.records if r.name == "fused_resnet" and r.levelno == logging.DEBUG]
    assert debug and str(model.fused_resnet_report) in debug[0].getMessage()


def test_repr_and_build_info_show_the_resolved_backend(monkeypatch):
    cpu = torch.device("cpu")
    chosen = backends.resolve(None, cpu)
    model = fused_resnet.resnet18(num_classes=3)
    assert f"backend=auto->{chosen}" in repr(model).splitlines()[1]
    assert f"backend=auto->{chosen}" in repr(model.layer1[0].bn1)
    assert backends.build_info()["resolved"]["cpu"] == chosen
    assert "backend=eager" in repr(fused_resnet.resnet18(num_classes=3, backend="eager").bn1)
    explicit = fused_resnet.resnet18(num_classes=3, backend="cuda")
    assert "backend=cuda (unavailable on cpu" in repr(explicit.bn1)
    monkeypatch.setattr(backends, "_default_backend", "eager")
    assert "backend=global->eager" in repr(model.bn1)
    assert backends.build_info()["resolved"]["cpu"] == "eager"


def test_automatic_eager_on_cuda_warns_once(monkeypatch):
    """No fused backend for CUDA tensors (mocked availability): automatic selection runs eager and says why,
    once per process; an explicit request is silent."""
    for b in ("triton", "cuda"):
        monkeypatch.setitem(backends._STATUS, (b, "cuda"), (False, f"{b} mocked away"))
    monkeypatch.setattr(backends, "_warned_auto_eager", False)
    cuda = torch.device("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve("eager", cuda) == "eager"
        assert not caught
        assert backends.resolve(None, cuda) == "eager"
        assert backends.resolve(None, cuda) == "eager"
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "triton: triton mocked away" in message and "cuda: cuda mocked away" in message
    assert backends.describe(None, cuda) == "auto->eager"
