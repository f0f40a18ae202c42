"""Where a dataset's IDX files are, and their bytes read ahead: without torch, so that a process
can start reading them (a thread: file reads, zlib and sha256 release the GIL) before it imports
torch, which takes the interpreter for seconds. `data.read_idx` takes the bytes from here."""

from __future__ import annotations

import gzip
import hashlib
import threading
from concurrent.futures import Future
from pathlib import Path

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = [name for pair in SPLIT_FILES.values() for name in pair]

# dataset name -> torchvision class name (also the folder torchvision downloads into)
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}

_READS: dict[Path, Future] = {}  # path -> (decompressed bytes, their sha256), read ahead
_TAKEN: set[Path] = set()  # files read before: decoded and cached (data.load_raw), not read again


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def candidate_folders(root: Path, dataset: str) -> list[Path]:
    """Where the four files may lie under `root`: itself, raw/, torchvision's layout, a named folder."""
    cls = TORCHVISION_CLASSES[dataset]
    return [
        root,
        root / "raw",
        root / cls / "raw",
        root / dataset,
        root / dataset.replace("_", "-"),
        root / dataset / "raw",
    ]


def locate(root: Path, dataset: str) -> dict[str, Path] | None:
    """The four IDX files of `dataset` under `root`, or None when no folder holds all four."""
    for folder in candidate_folders(root, dataset):
        found = {name: _find(folder, name) for name in ALL_FILES}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def read_ahead(root: str, dataset: str) -> None:
    """Start reading `dataset`'s four files under `root` in a thread, if they are there (a
    download is `data.load_raw`'s to do). Call it before torch is imported, after any fork."""
    found = locate(Path(root), dataset) if dataset in TORCHVISION_CLASSES else None
    if found is None:
        return
    reads: dict[Path, Future] = {
        p: Future() for p in found.values() if p not in _READS and p not in _TAKEN
    }
    if not reads:
        return
    _READS.update(reads)
    # the thread holds the futures themselves: read_file pops a file's future from _READS when
    # it waits on it, maybe before the thread reaches that file (a lookup then finds nothing)
    try:
        threading.Thread(target=_read_all, args=(reads,), name="read-ahead", daemon=True).start()
    except RuntimeError:  # no thread to spare (a pids limit): read_file reads them when asked
        for path in reads:
            _READS.pop(path, None)


def reads_ahead() -> list[str]:
    """The names of the files read ahead (or being read) that no one has taken yet."""
    return sorted(path.name for path in _READS)


def _read_all(reads: dict[Path, Future]) -> None:
    for path, future in reads.items():
        try:
            future.set_result(_read(path))
        except BaseException as error:  # raised where the file is used, as it would be there
            future.set_exception(error)


def read_file(path: Path) -> tuple[bytes, str]:
    """The file's decompressed bytes and their sha256: the read ahead (its error raised here),
    else read now."""
    _TAKEN.add(path)
    ahead = _READS.pop(path, None)
    return ahead.result() if ahead is not None else _read(path)


def _read(path: Path) -> tuple[bytes, str]:
    # gzip.decompress inflates the whole file in one zlib call, which releases the GIL; reading
    # through gzip.open takes the GIL back for every chunk, and beside torch's import (which
    # holds it) made the read ~3x longer and the import ~0.25 s slower (here, 2 cores).
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw, hashlib.sha256(raw).hexdigest()
