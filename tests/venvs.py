"""Cached virtual environments for tests that run code in a Python environment of its own.

    venv = build_venv(["dapr-agents==1.0.9"])                  # from the package index
    venv = build_venv(["httpx==0.27.2"], local=[REPO_ROOT])    # plus local projects, editable
    subprocess.run([str(venv.python), "-m", ...])

A venv is built once per key, under `.cache/venvs/` in the repo (git-ignored), and reused by
later runs. The key is a hash of what goes in: the interpreter's version, the requirements, and
each local project's path and `pyproject.toml` (local projects are installed editable, so the
venv follows their code; a change of their dependencies makes a new key).

Atomic: a build goes into a directory of its own (`<key>.<random>`) that never moves (a venv's
scripts name their own path); only when it is complete does the link `<key>` point to it (a
rename, atomic on POSIX). A build killed half-way leaves no link, only a directory that the next
build removes. A lock file serialises builds of one key across processes (pytest-xdist).

Bounded: the whole build must finish within `timeout` seconds, else `VenvBuildError` says what
was being installed, how long it took and where pip's log is.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ROOT = REPO_ROOT / ".cache" / "venvs"
DEFAULT_TIMEOUT = float(os.environ.get("DURAGATE_TEST_VENV_TIMEOUT", "900"))
STAMP = "duragate-venv.json"  # written last into a complete venv
# A directory of a build that started this long ago and was never linked is abandoned.
STALE_SECONDS = 3 * 3600


# The venvs the test suite uses, by name: requirements and local projects. `make test` builds
# them before pytest starts (`python -m tests.venvs`), so that the suite's own time does not
# include pip; a test asking for one that is not built yet builds it itself.
SUITE_VENVS: dict[str, tuple[tuple[str, ...], tuple[Path, ...]]] = {
    # An unmodified Dapr Agents (the latest 1.0.x; it pins dapr < 1.19): the dapr_agent tests.
    "dapr-agents": (("dapr-agents==1.0.9",), ()),
    # Duragate without extras, and six at a version other than the gateway venv's: a
    # `duragate worker` in an environment of its own.
    "worker": (("six==1.16.0",), (REPO_ROOT,)),
}


class VenvBuildError(RuntimeError):
    """The venv could not be built; the message says why and where the log is."""


@dataclass(frozen=True)
class Venv:
    path: Path  # the link `<cache>/<key>`
    key: str
    built: bool  # True when this call built it, False when it came from the cache
    seconds: float  # how long its build took (when it was built, by whichever run)

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def venv_key(requirements: Sequence[str], local: Sequence[Path] = ()) -> str:
    """The cache key of a venv with `requirements` and the `local` projects."""
    projects = []
    for project in local:
        path = Path(project).resolve()
        pyproject = path / "pyproject.toml"
        digest = hashlib.sha256(pyproject.read_bytes()).hexdigest() if pyproject.exists() else ""
        projects.append([str(path), digest])
    described = {
        "python": list(sys.version_info[:3]),
        "requirements": sorted(requirements),
        "local": sorted(projects),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def build_venv(
    requirements: Sequence[str],
    *,
    local: Sequence[Path] = (),
    root: Path | str = CACHE_ROOT,
    timeout: float = DEFAULT_TIMEOUT,
) -> Venv:
    """The venv with `requirements` (pip specifiers) and the `local` projects (installed
    editable, without extras), from the cache or built now within `timeout` seconds."""
    key = venv_key(requirements, local)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    link = root / key
    with _locked(root / f"{key}.lock"):
        cached = _complete(link)
        if cached is not None:
            return Venv(link, key, built=False, seconds=cached)
        _remove_abandoned(root, key)
        target = root / f"{key}.{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        try:
            _build(target, requirements, local, deadline=started + timeout, timeout=timeout)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        seconds = time.monotonic() - started
        stamp = {"requirements": list(requirements), "local": [str(p) for p in local]}
        (target / STAMP).write_text(json.dumps({**stamp, "seconds": round(seconds, 1)}))
        # Publish: a new link under a temporary name, renamed over `<key>` in one step.
        temporary = root / f".{key}.{uuid.uuid4().hex[:8]}.link"
        os.symlink(target.name, temporary)
        os.replace(temporary, link)
        return Venv(link, key, built=True, seconds=seconds)


def _complete(link: Path) -> float | None:
    """The build time of the complete venv at `link`, or None if there is none."""
    try:
        stamp = json.loads((link / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if not (link / "bin" / "python").exists():
        return None
    return float(stamp.get("seconds", 0.0))


def _remove_abandoned(root: Path, key: str) -> None:
    """Remove build directories of `key` that no link names (a killed build; the lock is held,
    so none is in progress), and directories of other keys abandoned long ago."""
    linked = {os.readlink(p) for p in root.iterdir() if p.is_symlink()}
    now = time.time()
    for path in root.iterdir():
        if path.is_symlink() or not path.is_dir() or path.name in linked:
            continue
        own_key = path.name.startswith(f"{key}.")
        if own_key or now - path.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(path, ignore_errors=True)
            path.with_name(path.name + ".log").unlink(missing_ok=True)


def _build(
    target: Path,
    requirements: Sequence[str],
    local: Sequence[Path],
    *,
    deadline: float,
    timeout: float,
) -> None:
    log_path = target.with_name(target.name + ".log")
    what = ", ".join([*requirements, *(str(p) for p in local)]) or "nothing"
    steps = [("python -m venv", [sys.executable, "-m", "venv", str(target)])]
    pip = [str(target / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    pip += ["--no-input", "install"]
    packages = list(requirements)
    for project in local:
        packages += ["--editable", str(Path(project).resolve())]
    if packages:
        steps.append(("pip install " + " ".join(packages), [*pip, *packages]))
    with log_path.open("ab") as log:
        for label, step in steps:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(step, 0)
                done = subprocess.run(
                    step, stdout=log, stderr=subprocess.STDOUT, timeout=remaining, check=False
                )
            except subprocess.TimeoutExpired:
                raise VenvBuildError(
                    f"building a venv with {what} took longer than {timeout:g} s (at: "
                    f"{label}); pip's output is in {log_path}. A slow index? Set "
                    "DURAGATE_TEST_VENV_TIMEOUT to allow more."
                ) from None
            if done.returncode != 0:
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                raise VenvBuildError(
                    f"building a venv with {what} failed ({label} exited with "
                    f"{done.returncode}); the end of pip's output ({log_path}):\n" + "\n".join(tail)
                )
    log_path.unlink(missing_ok=True)


def suite_venv(name: str) -> Venv:
    """The suite's venv `name` (SUITE_VENVS), from the cache or built now."""
    requirements, local = SUITE_VENVS[name]
    return build_venv(requirements, local=local)


def main() -> int:
    """Build every venv of the suite, side by side, and say how long each took."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(SUITE_VENVS)) as pool:
        futures = {name: pool.submit(suite_venv, name) for name in SUITE_VENVS}
        failed = 0
        for name, future in futures.items():
            try:
                venv = future.result()
            except VenvBuildError as exc:
                print(f"test venv {name}: {exc}", file=sys.stderr)
                failed += 1
                continue
            how = f"built in {venv.seconds:.0f} s" if venv.built else "cached"
            print(f"test venv {name}: {venv.path} ({how})")
    return 1 if failed else 0


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


if __name__ == "__main__":
    sys.exit(main())
