"""Packaging: the sdist holds what the build needs, the metadata is right, the build explains what it needs, and
an extension built against another torch is refused with the command that rebuilds it.

The fast tests build only an sdist (no compilation: a few seconds). The whole chain, sdist -> wheel -> fresh
virtualenv -> `fused-resnet check`, is scripts/check_package.sh, which CI runs after the suite (.ci/run);
test_sdist_wheel_venv_check runs it here when FUSED_RESNET_TEST_PACKAGING=1 (about 6 minutes on 2 cores)."""
import os
import random
import runpy
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib

import pytest
import torch
from packaging.specifiers import SpecifierSet

import fused_resnet
from fused_resnet import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_GIT = shutil.which("git") is not None and subprocess.run(
    ["git", "-C", ROOT, "rev-parse", "--is-inside-work-tree"], capture_output=True).returncode == 0
needs_git = pytest.mark.skipif(not IS_GIT, reason="needs a git checkout (the list of files to package)")
BUILD_FILES = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"]


def _git_files(*paths: str) -> list[str]:
    """Tracked files plus new ones not ignored (what a commit of this working tree would hold)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *paths],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if os.path.exists(os.path.join(ROOT, f))]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(members relative to the sdist's top folder, PKG-INFO text) of an sdist built from a copy of the
    checkout's files, plus what a developer's tree holds after an editable build: a compiled _C and the record
    of its torch, which must stay out of the sdist."""
    if not IS_GIT:
        pytest.skip("needs a git checkout (the list of files to package)")
    pytest.importorskip("build", reason="python -m build makes the sdist (scripts/setup_env.sh installs it)")
    work = tmp_path_factory.mktemp("sdist")
    src = work / "src"
    for f in _git_files():
        os.makedirs(src / os.path.dirname(f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    (src / "fused_resnet" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(os.urandom(64))
    (src / "fused_resnet" / "_torch_build.py").write_text("TORCH_VERSION = '0.0.1'\n")
    result = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(work / "dist"),
                             str(src)], cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (archive,) = (work / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
        license_text = tar.extractfile(f"{top}/LICENSE").read().decode()
    members = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    return dict(name=archive.name, members=members, pkg_info=pkg_info, license=license_text)


def _field(pkg_info: str, name: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in pkg_info.split("\n\n", 1)[0].splitlines()
            if line.startswith(name + ":")]


def test_sdist_contains_every_file_the_build_needs(sdist):
    needed = set(_git_files("csrc", "fused_resnet")) | set(BUILD_FILES)
    assert any(f.startswith("csrc/common/") for f in needed) and any(f.startswith("csrc/cuda/") for f in needed)
    missing = sorted(needed - sdist["members"])
    assert not missing, f"the sdist lacks files the build needs: {missing}"
    leaked = sorted(m for m in sdist["members"] if m.endswith((".so", ".o", ".pyc")) or m.endswith("_torch_build.py"))
    assert not leaked, f"build outputs of this machine in the sdist: {leaked}"


def test_license_file_and_spdx_expression(sdist):
    assert "BSD 3-Clause License" in sdist["license"] and "Redistribution and use" in sdist["license"]
    assert _field(sdist["pkg_info"], "License-Expression") == ["BSD-3-Clause"]
    assert _field(sdist["pkg_info"], "License-File") == ["LICENSE"]
    pyproject = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    assert pyproject["license"] == "BSD-3-Clause"
    # A license expression excludes the legacy "License ::" classifiers (setuptools refuses both).
    assert pyproject["classifiers"] and not [c for c in pyproject["classifiers"] if c.startswith("License ::")]
    assert _field(sdist["pkg_info"], "Summary") == [pyproject["description"]]


def test_version_has_one_source(sdist):
    pyproject = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fused_resnet._version.__version__"}
    assert _field(sdist["pkg_info"], "Version") == [fused_resnet.__version__]
    assert sdist["name"] == f"fused_resnet-{fused_resnet.__version__}.tar.gz"
    literal = [f for f in _git_files("fused_resnet") if f.endswith(".py")
               and "__version__ = " in open(os.path.join(ROOT, f)).read()]
    assert literal == ["fused_resnet/_version.py"], literal


def test_sdist_pins_the_torch_it_was_built_with(sdist):
    public = torch.__version__.split("+")[0]
    assert f"torch=={public}" in _field(sdist["pkg_info"], "Requires-Dist")
    assert not [r for r in _field(sdist["pkg_info"], "Requires-Dist") if r.startswith("torch") and r != f"torch=={public}"]


def test_torch_pin_is_the_public_version_and_accepts_local_builds():
    torch_requirement = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_under_test")["torch_requirement"]
    rng = random.Random()
    for _ in range(20):
        release = f"{rng.randint(2, 3)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"
        for local in ("", "+cpu", f"+cu{rng.randint(118, 130)}", "+rocm6.2"):
            pin = torch_requirement(release + local)
            assert pin == f"torch=={release}", (release, local, pin)
            spec = SpecifierSet(pin[len("torch"):])
            assert spec.contains(release + local) and spec.contains(release)
            assert not spec.contains(f"{release}.post1") and not spec.contains(f"{release.rsplit('.', 1)[0]}.99")
    assert torch_requirement("2.14.0.dev20260301+cu130") == "torch==2.14.0.dev20260301"


def test_build_without_torch_names_build_isolation():
    """What pip shows when build isolation hides the installed torch."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "build isolation" in result.stderr and "--no-build-isolation" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_torch_mismatch_message_names_both_versions_and_the_rebuild():
    running = torch.__version__
    built = f"{int(running.split('.')[0]) - 1}.{random.randint(0, 9)}.{random.randint(0, 9)}+cpu"
    reason = backends.torch_mismatch(built, running)
    assert built in reason and running in reason and "rebuild it" in reason
    assert f"`cd {ROOT} && pip install --no-build-isolation -e .`" in reason
    # Same release, other local label (a CPU build loaded by that release's CUDA torch): the same C++ API.
    assert backends.torch_mismatch(running.split("+")[0] + "+cu128", running) is None
    assert backends.torch_mismatch(None, running) is None


def test_rebuild_command_of_an_installed_wheel(monkeypatch):
    monkeypatch.setattr(backends, "_source_root", lambda: None)
    command = backends.rebuild_command()
    # Built from source again, and not from pip's cache (which holds the wheel built against the old torch).
    assert "--no-build-isolation" in command and "--no-cache-dir" in command and "--force-reinstall" in command
    assert "sdist" in backends._rebuild_hint()


def test_extension_built_against_another_torch_is_not_loaded():
    """An explicit 'cpu' backend raises with the rebuild command; automatic selection falls back to eager with a
    warning naming it; _C itself is never loaded."""
    built = f"{int(torch.__version__.split('.')[0]) - 1}.{random.randint(0, 9)}.0+cpu"
    code = textwrap.dedent(f"""
        import sys, types, warnings
        record = types.ModuleType("fused_resnet._torch_build")
        record.TORCH_VERSION = {built!r}
        sys.modules["fused_resnet._torch_build"] = record      # as if _C was built against another torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fused_resnet
        messages = " ".join(str(w.message) for w in caught)
        assert "compiled against torch {built}" in messages and "pip install --no-build-isolation -e ." in messages, messages
        assert "fused_resnet._C" not in sys.modules
        import torch
        info = fused_resnet.build_info()
        assert info["extension"] is False and info["extension_built_with_torch"] == {built!r}, info
        assert fused_resnet.backends.resolve(None, torch.device("cpu")) == "eager"
        x = torch.randn(3, 5, 4, 2, requires_grad=True)
        fused_resnet.BatchNormAct2d(5, fuse_relu=True)(x).sum().backward()
        assert x.grad is not None
        fused_resnet.set_backend("cpu")
        try:
            fused_resnet.batch_norm_act(x, None, None, training=True)
        except fused_resnet.BackendUnavailableError as exc:
            assert "rebuild it" in str(exc) and "pip install --no-build-isolation -e ." in str(exc), exc
            print("REFUSED-OK")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_RESNET_BACKEND")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "REFUSED-OK" in result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(os.environ.get("FUSED_RESNET_TEST_PACKAGING") != "1",
                    reason="the whole chain (sdist, wheel, fresh venv, fused-resnet check) compiles _C once more, "
                           "~6 min on 2 cores: CI runs it as scripts/check_package.sh; set "
                           "FUSED_RESNET_TEST_PACKAGING=1 to run it here")
@needs_git
def test_sdist_wheel_venv_check():
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "check_package.sh")], capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0 and "check_package: OK" in result.stdout, result.stdout[-5000:] + result.stderr[-3000:]
