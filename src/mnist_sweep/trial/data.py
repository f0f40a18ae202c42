"""Datasets as device-resident tensors: IDX files -> uint8 tensors -> normalized splits -> batches.

The files come from a local folder holding the four IDX files (raw or .gz) or, when they are not
there, from torchvision's dataset classes, which download and checksum them. Either way the files
are decoded once per process by `read_idx`, the whole split is moved to the training device once
and normalized there, and batches are slices of that tensor picked by a seeded `randperm`: no
DataLoader, transforms or worker processes in the hot path.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_sweep.base.errors import DataError
from mnist_sweep.trial.files import (  # noqa: F401  (theirs: where the files are, read ahead)
    ALL_FILES,
    SPLIT_FILES,
    TORCHVISION_CLASSES,
    candidate_folders,
    locate,
    read_file,
)

_UBYTE = 0x08  # IDX type code of unsigned bytes, the only one the MNIST family uses

# What the four files hold, whatever their names and compression: sha256 over the sha256 of each
# file's decompressed content (train images, train labels, test images, test labels). Computed
# from the original files (MNIST: byte-identical to torchvision's downloads; Fashion-MNIST: its
# published files). KMNIST's is not known here (no copy of it was at hand to compute it from):
# its files are accepted as a user's own data are, their digest recorded.
KNOWN_DIGESTS = {
    "c65580678af93f1ea48c2c0d01d543ec89307c6b8a0eb7ca542d7c18c5f4c681": "mnist",
    "d1fd84a877f3b78fa9a171b3de73f93e7b6f69ed94bada3feae9d96821401f5c": "fashion_mnist",
}


@dataclass(frozen=True)
class Split:
    """Images (N, 1, 28, 28) in torch's default dtype on the device, labels (N,) int64 there."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split | None
    test: Split


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: Path, expected_ndim: int, digests: list | None = None) -> torch.Tensor:
    """Decode one IDX file (raw or gzip) into a uint8 tensor, checking magic and length;
    the sha256 of its decompressed content goes to `digests`."""
    try:
        raw, digest = read_file(path)  # read ahead while torch was imported, or now
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"Cannot read the IDX file {path}: {error}. Replace it with an intact "
            "copy of the dataset file (raw or .gz)."
        ) from error
    header = 4 + 4 * expected_ndim
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != expected_ndim:
        magic = raw[:4].hex() if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise DataError(
            f"{path} is not an IDX file of {expected_ndim}-d unsigned bytes: its "
            f"magic number is {magic}, expected 0000080{expected_ndim}. Replace it with "
            "the original dataset file."
        )
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its own header.")
    dims = struct.unpack(f">{expected_ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DataError(
            f"{path} is truncated or padded: its header announces {dims} bytes of "
            f"data ({expected} bytes in all) but the file holds {len(raw)}. "
            "Replace it with an intact copy."
        )
    if digests is not None:
        digests.append(digest)
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())


def download(root: Path, dataset: str) -> None:
    """Let torchvision fetch and checksum the files into root/<Class>/raw: into a folder of
    their own first, each moved into place whole (os.replace), so that a download cut short
    (a failure, Ctrl-C, a kill) leaves no partial file there for `locate` to find."""
    import torchvision.datasets  # imported here: only a download needs it

    name = TORCHVISION_CLASSES[dataset]
    cls = getattr(torchvision.datasets, name)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset}-download-", dir=root))
    try:
        for train in (True, False):
            cls(str(staging), train=train, download=True)
        target = root / name / "raw"
        target.mkdir(parents=True, exist_ok=True)
        for file in sorted((staging / name / "raw").iterdir()):
            os.replace(file, target / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def missing_files_error(root: Path, dataset: str, reason: str) -> DataError:
    return DataError(
        f"No {dataset} files under data.root={root} ({reason}). Put the four IDX files "
        f"{', '.join(ALL_FILES)} (raw or .gz) in that folder, in {root}/raw or in "
        f"{root}/{TORCHVISION_CLASSES[dataset]}/raw, or point data.root (env MNIST_SWEEP_DATA) "
        "at a folder that holds them; with network access, data.download=true fetches them."
    )


def find_or_download(root: Path, dataset: str, allow_download: bool) -> dict[str, Path]:
    if dataset not in TORCHVISION_CLASSES:
        raise DataError(
            f"Unknown dataset data.name={dataset!r}; allowed: "
            f"{', '.join(sorted(TORCHVISION_CLASSES))}."
        )
    files = look_for(root, dataset)
    if files is not None:
        return files
    if not allow_download:
        raise missing_files_error(root, dataset, "data.download=false")
    try:
        download(root, dataset)
    except Exception as error:  # torchvision raises URLError, RuntimeError, OSError...
        reason = " ".join(str(error).split())[:200]
        raise missing_files_error(root, dataset, f"the download failed: {reason}") from error
    files = look_for(root, dataset)
    if files is None:
        raise missing_files_error(root, dataset, "the download left no files")
    return files


def look_for(root: Path, dataset: str) -> dict[str, Path] | None:
    """files.locate, or a DataError where the folder cannot be looked in."""
    try:
        return locate(root, dataset)
    except OSError as error:  # a folder this user may not read, a name too long
        raise DataError(
            f"Cannot look for {dataset}'s files under data.root={root}: {error}. Point "
            "data.root (env MNIST_SWEEP_DATA) at a folder this user can read, by a valid path."
        ) from None


@functools.lru_cache(maxsize=4)
def load_raw(root: str, dataset: str, allow_download: bool) -> dict:
    """{"train"|"test": (uint8 images (N,28,28), int64 labels (N,)), "digest": the files'
    content digest, "folder": where they are}, decoded once per process. Files that are another
    known dataset than `dataset` are refused (Fashion-MNIST's files under an MNIST name, say)."""
    files = find_or_download(Path(root), dataset, allow_download)
    splits: dict = {}
    digests: list[str] = []
    for split, (image_file, label_file) in SPLIT_FILES.items():
        images = read_idx(files[image_file], expected_ndim=3, digests=digests)
        labels = read_idx(files[label_file], expected_ndim=1, digests=digests).long()
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{files[image_file]} holds {images.shape[0]} images but "
                f"{files[label_file]} holds {labels.shape[0]} labels; they must match."
            )
        splits[split] = (images, labels)
    splits["digest"] = hashlib.sha256("".join(digests).encode()).hexdigest()
    splits["folder"] = str(files[ALL_FILES[0]].parent)
    known = KNOWN_DIGESTS.get(splits["digest"])
    if known is not None and known != dataset:
        raise DataError(
            f"The files under data.root={root} are {known}'s (by their content's "
            f"digest {splits['digest'][:12]}...), not {dataset}'s: data={dataset} "
            f"would train on {known} and report it as {dataset}. Point data.root at "
            f"{dataset}'s files, or use data={known}."
        )
    return splits


def split_sizes(raw: dict, val_size: int) -> dict[str, int]:
    """Images in each split the trial trains, validates and tests on."""
    return {"train": train_size(raw) - val_size, "val": val_size, "test": raw["test"][1].shape[0]}


# ----------------------------------------------------------------------------- splits on device


def _to_device(
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    normalize: bool,
    mean: float,
    std: float,
) -> Split:
    # torch's default dtype: float32, unless a caller (the float64 equivalence tests) changed it
    x = images.to(device).unsqueeze(1).to(torch.get_default_dtype()).div_(255.0)
    if normalize:
        x.sub_(mean).div_(std)
    return Split(x, labels.to(device))


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/validation partition of range(n)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def train_size(raw: dict) -> int:
    return raw["train"][1].shape[0]


def make_splits(
    raw: dict,
    device: torch.device,
    val_size: int,
    seed: int,
    normalize: bool = True,
    mean: float = 0.0,
    std: float = 1.0,
) -> Splits:
    images, labels = raw["train"]
    train_idx, val_idx = split_indices(labels.shape[0], val_size, seed)

    def on_device(images: torch.Tensor, labels: torch.Tensor) -> Split:
        return _to_device(images, labels, device, normalize, mean, std)

    return Splits(
        train=on_device(images[train_idx], labels[train_idx]),
        val=on_device(images[val_idx], labels[val_idx]) if val_size > 0 else None,
        test=on_device(*raw["test"]),
    )


_SPLITS_CACHE: dict[tuple, Splits] = {}


def load_splits(data_cfg, device: torch.device) -> Splits:
    """Splits for a `data` config group on `device`; cached, so a sweep worker loads them once."""
    key = (
        str(data_cfg.root),
        data_cfg.name,
        int(data_cfg.val_size),
        int(data_cfg.seed),
        bool(data_cfg.normalize),
        float(data_cfg.mean),
        float(data_cfg.std),
        str(device),
        torch.get_default_dtype(),
    )
    if key not in _SPLITS_CACHE:
        raw = load_raw(str(data_cfg.root), data_cfg.name, bool(data_cfg.download))
        _SPLITS_CACHE.clear()  # keep one dataset resident at a time
        _SPLITS_CACHE[key] = make_splits(
            raw,
            device,
            int(data_cfg.val_size),
            int(data_cfg.seed),
            bool(data_cfg.normalize),
            float(data_cfg.mean),
            float(data_cfg.std),
        )
    return _SPLITS_CACHE[key]


def shuffled_order(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A fresh seeded permutation of range(n) for one epoch; its `split(batch_size)` are the
    batches' indices (the last batch may be short)."""
    return torch.randperm(n, generator=generator, device=device)
