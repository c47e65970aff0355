"""Where Duragate keeps its data.

The data directory holds the embedded engine's SQLite file (`engine.db`) and, later, everything
else the gateway persists. It is resolved once per process: the `--data-dir` option beats the
`DURAGATE_DATA_DIR` environment variable, which beats a value from the config file, which beats
the default `./.duragate`. It is created with mode 0700 when missing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

ENV_DATA_DIR = "DURAGATE_DATA_DIR"
DEFAULT_DATA_DIR = Path(".duragate")
ENGINE_DB_NAME = "engine.db"


class DataDirError(Exception):
    """The data directory cannot be used (it is a file, or cannot be created)."""


def resolve_data_dir(
    option: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_value: str | os.PathLike[str] | None = None,
) -> Path:
    """Pick the data directory: option > environment > config file > default.

    Empty strings count as unset. The result is absolute (relative paths are taken from the
    current directory) but is not created: see `ensure_data_dir`.
    """
    environ = os.environ if env is None else env
    for candidate in (option, environ.get(ENV_DATA_DIR), config_value):
        if candidate is not None and str(candidate) != "":
            return Path(candidate).expanduser().absolute()
    return DEFAULT_DATA_DIR.absolute()


def ensure_data_dir(path: Path) -> Path:
    """Create `path` (mode 0700, parents as needed) unless it is already a directory.

    Raises `DataDirError` if it exists and is not a directory, or cannot be created.
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise DataDirError(f"data directory {path} exists and is not a directory") from None
    except OSError as exc:
        raise DataDirError(f"cannot create data directory {path}: {exc.strerror or exc}") from exc
    return path


def is_private(path: Path) -> bool:
    """True when neither group nor others have any access to `path`."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def engine_db_path(data_dir: Path) -> Path:
    """The embedded engine's SQLite file inside the data directory."""
    return data_dir / ENGINE_DB_NAME
