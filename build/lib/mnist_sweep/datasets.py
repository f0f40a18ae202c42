"""The splits a run trains, validates and tests on, as MLflow datasets (the runs table's Dataset
column, the run page's Datasets): which files (a digest of their decompressed content), which
images of them (split seed, validation size) and how many.

MLflow's ready-made datasets (pandas, numpy, torch) hash the data they are given; ours are four
IDX files already digested while they were read (data.load_raw), so a small Dataset subclass
records that digest instead of hashing 70,000 images again for every run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path

from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import resolve_dataset_source

from mnist_sweep.data import KNOWN_DIGESTS, load_raw, split_sizes

# The Dataset column shows a split by its MLflow context tag: training, validation or testing.
CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


class IdxSplit(Dataset):
    """One split of an IDX dataset: `mnist/train` (55,000 images of MNIST's training files)."""

    def __init__(self, folder: str, name: str, files_digest: str, split: str, num_images: int,
                 split_seed: int, val_size: int):
        self._profile = {"num_images": num_images, "files_digest": files_digest,
                         "known_as": KNOWN_DIGESTS.get(files_digest, "unknown (own data)"),
                         "split_seed": split_seed, "val_size": val_size}
        self._split = split
        with warnings.catch_warnings():  # a local folder: "can be interpreted in multiple ways"
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(folder).resolve()))
        super().__init__(source=source,
                         name=f"{name}/{split}")

    def _compute_digest(self) -> str:
        # The same files, split the same way, give the same digest (MLflow shows 8 characters).
        p = self._profile
        key = f"{p['files_digest']}:{self._split}:{p['split_seed']}:{p['val_size']}"
        return hashlib.sha256(key.encode()).hexdigest()[:8]

    @property
    def profile(self) -> dict:
        return self._profile

    @property
    def schema(self) -> dict:
        return {"images": "uint8[28, 28]", "labels": "int64 (0-9)"}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile),
                "schema": json.dumps(self.schema)}


def split_datasets(data_cfg) -> list[tuple[str, IdxSplit]]:
    """[(MLflow context, dataset)] for the splits of a `data` config (no validation split when
    val_size is 0). The files are read once per process (load_raw is cached)."""
    return _split_datasets(str(data_cfg.root), data_cfg.name, bool(data_cfg.download),
                           int(data_cfg.val_size), int(data_cfg.seed))


@functools.lru_cache(maxsize=4)
def _split_datasets(root: str, name: str, download: bool, val_size: int,
                    seed: int) -> list[tuple[str, IdxSplit]]:
    raw = load_raw(root, name, download)
    sizes = split_sizes(raw, val_size)
    seed_of = {"train": seed, "val": seed, "test": None}  # the test split is the test files, whole
    return [(CONTEXTS[split], IdxSplit(raw["folder"], name, raw["digest"], split, n,
                                       seed_of[split], val_size if split != "test" else 0))
            for split, n in sizes.items() if n > 0]
