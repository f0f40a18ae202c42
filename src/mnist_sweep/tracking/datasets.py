"""The splits a run trains, validates and tests on, as MLflow datasets (the runs table's Dataset
column, the run page's Datasets): which files (a digest of their decompressed content), which
images of them (split seed, validation size) and how many.

They are MLflow's dataset entities, logged with `MlflowClient.log_inputs` (what `mlflow.log_input`
sends for a `mlflow.data` dataset). MLflow's ready-made datasets (numpy, pandas, torch) would hash
70,000 images again for every run, where the files' digest, taken while they were read
(data.load_raw), says it already.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import Dataset

# The Dataset column shows a split by its MLflow context tag: training, validation or testing.
CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}
SCHEMA = json.dumps({"images": "uint8[28, 28]", "labels": "int64 (0-9)"})


def split_entity(
    folder: str,
    name: str,
    files_digest: str,
    split: str,
    num_images: int,
    split_seed: int | None,
    val_size: int,
    known_as: str,
):
    """`mnist/train`: one split of an IDX dataset as an mlflow.entities.Dataset."""
    from mlflow.entities import Dataset

    profile = {
        "num_images": num_images,
        "files_digest": files_digest,
        "known_as": known_as,
        "split_seed": split_seed,
        "val_size": val_size,
    }
    # The same files split the same way give the same digest (MLflow shows 8 characters).
    digest = hashlib.sha256(f"{files_digest}:{split}:{split_seed}:{val_size}".encode()).hexdigest()[
        :8
    ]
    return Dataset(
        name=f"{name}/{split}",
        digest=digest,
        source_type="local",
        source=json.dumps({"uri": str(Path(folder).resolve())}),
        schema=SCHEMA,
        profile=json.dumps(profile),
    )


def split_datasets(data_cfg) -> list[tuple[str, Dataset]]:
    """[(MLflow context, dataset entity)] for the splits of a `data` config (no validation split
    when val_size is 0). The files are read once per process (load_raw is cached)."""
    return datasets_of(split_descriptions(data_cfg))


def datasets_of(descriptions: list[tuple[str, dict]]) -> list[tuple[str, Dataset]]:
    """The entities of `split_descriptions`: built where MLflow is imported (`make train`'s
    writer process), the descriptions taken where the data is read."""
    return [(context, split_entity(**fields)) for context, fields in descriptions]


def split_descriptions(data_cfg) -> list[tuple[str, dict]]:
    """[(MLflow context, split_entity's arguments)]: plain data, without MLflow."""
    return _split_descriptions(
        str(data_cfg.root),
        data_cfg.name,
        bool(data_cfg.download),
        int(data_cfg.val_size),
        int(data_cfg.seed),
    )


@functools.lru_cache(maxsize=4)
def _split_descriptions(
    root: str, name: str, download: bool, val_size: int, seed: int
) -> list[tuple[str, dict]]:
    # here, not at the top: the data module imports torch, which a writer process does not need
    from mnist_sweep.trial.data import KNOWN_DIGESTS, load_raw, split_sizes

    raw = load_raw(root, name, download)
    return [
        (
            CONTEXTS[split],
            {
                "folder": raw["folder"],
                "name": name,
                "files_digest": raw["digest"],
                "split": split,
                "num_images": n,
                "split_seed": seed if split != "test" else None,  # test: the whole file
                "val_size": val_size if split != "test" else 0,
                "known_as": KNOWN_DIGESTS.get(raw["digest"], "unknown (own data)"),
            },
        )
        for split, n in split_sizes(raw, val_size).items()
        if n > 0
    ]
