"""IDX decoding, file discovery, splits and batches."""

import gzip
import shutil

import numpy as np
import pytest
import torch

from mnist_sweep.trial import data
from mnist_sweep.base.errors import DataError
from conftest import N_TEST, N_TRAIN, make_synthetic_mnist, write_idx


def test_read_idx_decodes_raw_and_gzip_alike(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "a-idx3-ubyte", array)
    write_idx(tmp_path / "a-idx3-ubyte.gz", array)
    raw = data.read_idx(tmp_path / "a-idx3-ubyte", expected_ndim=3)
    gz = data.read_idx(tmp_path / "a-idx3-ubyte.gz", expected_ndim=3)
    assert raw.dtype == torch.uint8 and raw.shape == (2, 28, 28)
    assert torch.equal(raw, gz) and torch.equal(raw, torch.from_numpy(array))


def test_wrong_magic_is_named(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.zeros(10, dtype=np.uint8))  # 1-d labels where 3-d images are expected
    with pytest.raises(DataError, match="magic number is 00000801, expected 00000803"):
        data.read_idx(path, expected_ndim=3)


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "images"
    write_idx(path, np.zeros((3, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(path, expected_ndim=3)


def test_corrupt_gzip_is_named(tmp_path):
    """Not gzip, a gzip cut short, and one whose compressed stream is damaged: each a DataError."""
    path = tmp_path / "images.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="Cannot read the IDX file"):
        data.read_idx(path, expected_ndim=3)
    write_idx(path, np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8))
    intact = path.read_bytes()
    path.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(DataError, match="Cannot read the IDX file"):
        data.read_idx(path, expected_ndim=3)
    damaged = bytearray(intact)
    damaged[20:40] = b"\xff" * 20  # inside the deflate stream, past the 10-byte header
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="Cannot read the IDX file"):
        data.read_idx(path, expected_ndim=3)


@pytest.mark.parametrize("layout", [".", "raw", "MNIST/raw", "mnist"])
def test_files_are_found_in_every_supported_layout(tmp_path, mnist_dir, layout):
    target = tmp_path / layout
    shutil.copytree(mnist_dir, target, dirs_exist_ok=True)
    files = data.locate(tmp_path, "mnist")
    assert files is not None and set(files) == set(data.ALL_FILES)


def test_missing_files_without_download_name_the_folder_and_the_four_files(tmp_path):
    with pytest.raises(DataError) as info:
        data.find_or_download(tmp_path, "mnist", allow_download=False)
    message = str(info.value)
    assert str(tmp_path) in message and all(name in message for name in data.ALL_FILES)


def test_raw_load_has_both_splits_with_matching_labels(mnist_dir):
    raw = data.load_raw(str(mnist_dir), "mnist", False)
    assert raw["train"][0].shape == (N_TRAIN, 28, 28) and raw["test"][1].shape == (N_TEST,)
    assert raw["train"][1].dtype == torch.long and int(raw["train"][1].max()) <= 9


def test_validation_split_is_seeded_and_disjoint():
    train_a, val_a = data.split_indices(1000, 100, seed=3)
    train_b, val_b = data.split_indices(1000, 100, seed=3)
    assert torch.equal(val_a, val_b) and len(val_a) == 100 and len(train_a) == 900
    assert not set(train_a.tolist()) & set(val_a.tolist())
    assert not torch.equal(val_a, data.split_indices(1000, 100, seed=4)[1])


def test_splits_are_normalized_on_the_device(mnist_dir):
    raw = data.load_raw(str(mnist_dir), "mnist", False)
    splits = data.make_splits(raw, torch.device("cpu"), val_size=100, seed=0, normalize=True,
                              mean=0.5, std=0.25)
    assert splits.train.images.shape == (N_TRAIN - 100, 1, 28, 28) and len(splits.val) == 100
    expected = (raw["test"][0][0].float() / 255 - 0.5) / 0.25
    assert torch.allclose(splits.test.images[0, 0], expected)
    no_val = data.make_splits(raw, torch.device("cpu"), val_size=0, seed=0)
    assert no_val.val is None and len(no_val.train) == N_TRAIN


def test_batches_cover_the_split_once_in_a_seeded_order():
    gen = torch.Generator().manual_seed(0)
    batches = data.shuffled_order(105, gen, torch.device("cpu")).split(20)
    assert [len(b) for b in batches] == [20] * 5 + [5]
    assert sorted(torch.cat(batches).tolist()) == list(range(105))
    again = data.shuffled_order(105, torch.Generator().manual_seed(0), torch.device("cpu")).split(20)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


@pytest.mark.skipif(not (data.__file__ and __import__("conftest").SHARED_MNIST.exists()),
                    reason="real MNIST not beside the repo (../shared/data/mnist)")
@pytest.mark.slow
def test_real_mnist_decodes_to_the_known_figures():
    from conftest import SHARED_MNIST

    raw = data.load_raw(str(SHARED_MNIST), "mnist", False)
    labels = raw["train"][1]
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                               5851, 5949]
    assert round(raw["train"][0].float().mean().item(), 2) == 33.32
    assert round(raw["test"][0].float().mean().item(), 2) == 33.79


def test_files_of_another_known_dataset_are_refused_and_unknown_files_accepted(tmp_path, monkeypatch):
    folder = make_synthetic_mnist(tmp_path / "files")
    own = data.load_raw(str(folder), "mnist", False)  # a user's own IDX data: accepted, digested
    assert len(own["digest"]) == 64 and own["folder"] == str(folder)
    data.load_raw.cache_clear()
    # These very files, known as Fashion-MNIST's (the real digests need the real files: the slow
    # tier's test_real_data tries MNIST's files under data=fashion_mnist).
    monkeypatch.setitem(data.KNOWN_DIGESTS, own["digest"], "fashion_mnist")
    with pytest.raises(DataError, match=r"are fashion_mnist's .* not mnist's.*use data=fashion_mnist"):
        data.load_raw(str(folder), "mnist", False)
    assert data.load_raw(str(folder), "fashion_mnist", False)["digest"] == own["digest"]
    data.load_raw.cache_clear()


def test_the_same_files_give_the_same_digest_whatever_their_compression(tmp_path):
    mixed = make_synthetic_mnist(tmp_path / "mixed")  # train images gzip'd, the rest raw
    plain = tmp_path / "plain"
    plain.mkdir()
    for path in mixed.iterdir():
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as src, open(plain / path.name.removesuffix(".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert (data.load_raw(str(mixed), "mnist", False)["digest"]
            == data.load_raw(str(plain), "mnist", False)["digest"])


def test_files_read_ahead_decode_as_files_read_then(tmp_path):
    """make train and a sweep's training process read the files in a thread while torch is
    imported: the same tensors and digest as a read at load time, a corrupt file the same error."""
    from mnist_sweep.trial.files import read_ahead

    folder = make_synthetic_mnist(tmp_path / "data")
    data.load_raw.cache_clear()
    then = data.load_raw(str(folder), "mnist", False)
    data.load_raw.cache_clear()
    read_ahead(str(folder), "mnist")
    ahead = data.load_raw(str(folder), "mnist", False)
    data.load_raw.cache_clear()
    assert ahead["digest"] == then["digest"]
    assert all(torch.equal(a, b) for split in ("train", "test")
               for a, b in zip(ahead[split], then[split]))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    images = data.locate(corrupt, "mnist")["train-images-idx3-ubyte"]
    images.write_bytes(b"not gzip at all" if images.suffix == ".gz" else b"\x00\x00")
    read_ahead(str(corrupt), "mnist")
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as error:
        data.load_raw(str(corrupt), "mnist", False)
    data.load_raw.cache_clear()
    with pytest.raises(DataError) as error_then:
        data.load_raw(str(corrupt), "mnist", False)
    assert str(error.value) == str(error_then.value)


def test_a_file_asked_for_while_it_is_read_ahead_gets_its_bytes(tmp_path):
    """The race CI met: read_file takes the file's future while the read-ahead thread still
    reads it; the thread must still answer that future (it once looked it up again, found it
    gone, and the wait never ended). Provoked many times, each wait bounded."""
    import queue
    import threading

    from mnist_sweep.trial import files

    folder = make_synthetic_mnist(tmp_path / "data")
    paths = files.locate(folder, "mnist")
    first, last = list(paths.values())[0], list(paths.values())[-1]
    # the first file made big: the thread is still on it when the last is asked for
    big = np.random.default_rng(0).integers(0, 4, 8_000_000, dtype=np.uint8).tobytes()
    first.write_bytes(gzip.compress(big, 1) if first.suffix == ".gz" else big)
    expected = files._read(last)
    for _ in range(10):
        files.read_ahead(str(folder), "mnist")
        answers: queue.Queue = queue.Queue()  # a daemon thread asks: a hang fails, not blocks exit
        threading.Thread(target=lambda: answers.put(files.read_file(last)), daemon=True).start()
        assert answers.get(timeout=30) == expected  # before the fix: never answered
        for path in paths.values():  # the others, so the next round reads them all again
            files.read_file(path)


def test_a_download_lands_whole_or_not_at_all(tmp_path, mnist_dir, monkeypatch):
    """torchvision's download, from a local server: one that fails partway (a file served cut
    short fails its checksum; Ctrl-C or a kill would cut it the same way) leaves no file in
    data.root for the next run to take as the dataset; a whole one lands in root/MNIST/raw, where
    the next run finds it without downloading."""
    import functools
    import hashlib
    import http.server
    import threading

    import torchvision.datasets

    from mnist_sweep.base.errors import DataError
    from mnist_sweep.trial.files import ALL_FILES, _read, locate

    served = tmp_path / "served"
    served.mkdir()
    whole, resources = {}, []
    for name, path in locate(mnist_dir, "mnist").items():
        whole[name] = gzip.compress(_read(path)[0])
    for name in ALL_FILES:  # torchvision's order: train images, train labels, test images, labels
        (served / f"{name}.gz").write_bytes(whole[name])
        resources.append((f"{name}.gz", hashlib.md5(whole[name]).hexdigest()))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors",
                        [f"http://127.0.0.1:{server.server_address[1]}/"])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    root = tmp_path / "root"
    try:
        last = served / f"{ALL_FILES[-1]}.gz"
        last.write_bytes(whole[ALL_FILES[-1]][:20])  # the last file cut short
        with pytest.raises(DataError, match="download failed"):
            data.find_or_download(root, "mnist", allow_download=True)
        assert [p for p in root.rglob("*") if p.is_file()] == []  # three whole files: not kept
        assert list(root.iterdir()) == []
        last.write_bytes(whole[ALL_FILES[-1]])
        files = data.find_or_download(root, "mnist", allow_download=True)
    finally:
        server.shutdown()
    assert set(files) == set(ALL_FILES)
    assert {path.parent for path in files.values()} == {root / "MNIST" / "raw"}
    assert [p.name for p in root.iterdir()] == ["MNIST"]  # no download folder left
    assert data.find_or_download(root, "mnist", allow_download=False) == files
    assert torch.equal(data.read_idx(files[ALL_FILES[0]], 3),
                       data.read_idx(locate(mnist_dir, "mnist")[ALL_FILES[0]], 3))
