"""tests/venvs.py: cached, atomic, bounded venv builds (with no requirements: no index needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.venvs import STAMP, VenvBuildError, build_venv, venv_key

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def test_a_venv_is_built_once_then_reused(tmp_path: Path) -> None:
    first = build_venv([], root=tmp_path)
    assert first.built and first.path == tmp_path / venv_key([])
    assert first.path.is_symlink() and (first.path / STAMP).exists()
    prefix = subprocess.run(
        [str(first.python), "-c", "import sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert prefix == str(first.path)
    again = build_venv([], root=tmp_path)
    assert not again.built and again.path == first.path
    assert again.seconds == pytest.approx(first.seconds, abs=0.1)


def test_the_key_covers_requirements_and_local_projects(tmp_path: Path) -> None:
    assert venv_key(["a==1"]) == venv_key(["a==1"])
    assert venv_key(["a==1", "b"]) == venv_key(["b", "a==1"])
    assert venv_key(["a==1"]) != venv_key(["a==2"])
    project = tmp_path / "p"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'p'\nversion = '1'\n")
    before = venv_key([], [project])
    (project / "pyproject.toml").write_text("[project]\nname = 'p'\nversion = '2'\n")
    assert venv_key([], [project]) != before != venv_key([])


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    not_a_project = tmp_path / "empty"
    not_a_project.mkdir()
    root = tmp_path / "venvs"
    with pytest.raises(VenvBuildError) as info:
        build_venv([], local=[not_a_project], root=root)
    message = str(info.value)
    assert "failed (pip install --editable" in message and "exited with" in message
    assert str(not_a_project) in message
    assert not [p for p in root.iterdir() if p.is_symlink() or p.is_dir()]


def test_a_build_past_its_time_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(VenvBuildError, match=r"took longer than 0\.01 s \(at: python -m venv\)"):
        build_venv([], root=tmp_path, timeout=0.01)
    assert not [p for p in tmp_path.iterdir() if p.is_symlink() or p.is_dir()]


@pytest.mark.crash
def test_a_killed_build_leaves_no_venv_and_the_next_build_cleans_up(tmp_path: Path) -> None:
    key = venv_key([])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    code = f"from tests.venvs import build_venv; build_venv([], root={str(tmp_path)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(f"{key}.*/bin")):  # the build is under way
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not (tmp_path / key).exists()  # no link: no venv, half or whole
    (abandoned,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    venv = build_venv([], root=tmp_path)
    assert venv.built and not abandoned.exists()
    assert (venv.path / STAMP).exists()
