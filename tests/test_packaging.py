"""Packaging and the test suite itself: the wheel holds every module; tests that load the
embedded model carry the ``slow`` marker."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(folder: Path, package: str) -> set[str]:
    return {f"{package}/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*.py")
            if "__pycache__" not in p.parts}


def _source_copy(dest: Path) -> Path:
    """The source tree without build outputs (a stale build/lib would put modules in the
    wheel that the source no longer has), plus the extensions already compiled there, with
    their times, so that build_ext finds them up to date (a fresh compile of the automaton
    is ~20 s of CPU)."""
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  ".benchmarks", "*.so")
    shutil.copytree(ROOT, dest, ignore=skip)
    for so in (ROOT / "build").glob("lib*/cotrt/*.so"):
        target = dest / so.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, target)
    return dest


def test_wheel_holds_every_module(tmp_path):
    """A non-editable install holds every module of cotrt/ (cotrt.testbed was left out by a
    hand-written package list) and kernels/ as cotrt.kernels, and no top-level kernels."""
    pytest.importorskip("pybind11", reason="the test extra installs pybind11 (build without isolation)")
    src = _source_copy(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("cotrt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = _modules(ROOT / "cotrt", "cotrt") | _modules(ROOT / "kernels", "cotrt/kernels")
    assert "cotrt/testbed/train.py" in want
    assert not want - names, f"missing from the wheel: {sorted(want - names)}"
    assert any(n.startswith("cotrt/_C.") for n in names)
    assert not any(n.startswith("kernels/") for n in names)


def test_tests_that_load_smollm2_are_marked_slow():
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "-p", "no:cacheprovider",
                        "tests/test_engine.py", "tests/test_cli.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    slow = {ln.split("[")[0] for ln in r.stdout.splitlines() if "::" in ln}
    assert "tests/test_engine.py::test_plain_model_budget_and_answer" in slow  # smol_model fixture
    assert "tests/test_cli.py::test_generate_streams_and_reports" in slow  # the CLI's default model
    assert "tests/test_engine.py::test_think_budget_end_to_end" not in slow  # a tiny random model
    assert "tests/test_cli.py::test_version_and_help" not in slow
