"""Bad input on the command line: one paragraph naming the value, exit != 0, no traceback, and an
existing mlflow.db left exactly as it was."""

import re
import shutil

import numpy as np
import pytest

from conftest import FAST, file_digest, run_cli, write_idx


@pytest.fixture(scope="session")  # once per pytest process: xdist interleaves modules
def existing_store(tmp_path_factory, mnist_dir):
    """An mlflow.db holding one finished run, made by the real CLI."""
    folder = tmp_path_factory.mktemp("store")
    out = run_cli("mnist_sweep.train", f"data.root={mnist_dir}", *FAST, "train.epochs=1",
                  cwd=folder)
    assert out.returncode == 0, out.stderr
    return folder / "mlflow.db"


def corrupt_copy(tmp_path, mnist_dir, how):
    folder = tmp_path / f"corrupt-{how}"
    shutil.copytree(mnist_dir, folder)
    target = folder / "t10k-images-idx3-ubyte"
    if how == "magic":
        write_idx(target, np.zeros(5, dtype=np.uint8))
    else:
        target.write_bytes(target.read_bytes()[:1000])
    return folder


CASES = {
    # name: (overrides after the synthetic data and fast budget, text the message must hold)
    "unknown group option": (["schedule=warmup"], ["schedule=warmup", "cosine", "plateau"]),
    "unknown key": (["optim.momentun=0.9"], ["optim.momentun", "momentum"]),
    "momentum 1": (["optim.momentum=1.0"], ["optim.momentum=1.0", "[0, 1)"]),
    "momentum negative": (["optim.momentum=-0.1"], ["optim.momentum=-0.1", "[0, 1)"]),
    "lr zero": (["optim.lr=0"], ["optim.lr=0", "> 0"]),
    "lr negative": (["optim.lr=-0.5"], ["optim.lr=-0.5", "> 0"]),
    "batch size zero": (["train.batch_size=0"], ["train.batch_size=0", "> 0"]),
    "batch larger than split": (["train.batch_size=5000"], ["train.batch_size=5000", "500"]),
    "val_size too large": (["data.val_size=600"], ["data.val_size=600", "600"]),
    "epochs zero": (["train.epochs=0"], ["train.epochs=0", ">= 1"]),
    "cuda without cuda": (["train.device=cuda"], ["train.device=cuda", "cpu"]),
    "bad device": (["train.device=tpu"], ["train.device='tpu'", "cuda:N"]),
    "unknown tracking scheme": (["tracking.tracking_uri=foo://bar"], ["foo://bar", "sqlite:///"]),
    "file store": (["tracking.tracking_uri=./mlruns"], ["./mlruns", "file store"]),
    "sqlite folder missing": (["tracking.tracking_uri=sqlite:///no/such/dir/m.db"],
                              ["no/such/dir", "does not exist"]),
    "unreachable server": (["tracking.tracking_uri=http://127.0.0.1:9"],
                           ["http://127.0.0.1:9", "cannot be reached"]),
    "password not shown": (["tracking.tracking_uri=http://bob:hunter2@127.0.0.1:9"],
                           ["bob:***@127.0.0.1:9"]),
    "plateau on val_loss per batch": (["schedule=plateau", "schedule.monitor=val_loss"],
                                      ["val_loss", "interval=epoch"]),
    "bad schedule argument": (["schedule=step", "schedule.gamma=-1"], ["schedule.gamma=-1", "> 0"]),
    "bad plateau factor": (["schedule=plateau", "schedule.factor=1.5"],
                           ["schedule.factor=1.5", "(0, 1)"]),
    "unset environment variable": (["data.root=${oc.env:MNIST_SWEEP_UNSET_IN_TESTS}"],
                                   ["cannot be resolved", "MNIST_SWEEP_UNSET_IN_TESTS"]),
    "unset environment variable in the store's URI": (
        ["tracking.tracking_uri=${oc.env:MNIST_SWEEP_UNSET_IN_TESTS}"],
        ["cannot be resolved", "MNIST_SWEEP_UNSET_IN_TESTS"]),
    "data root name too long": ([f"data.root=/tmp/{'x' * 300}"],
                                ["data.root=/tmp/xxx", "File name too long"]),
    "data root name too long, trained in-process": (  # (the model logged: no training process)
        [f"data.root=/tmp/{'x' * 300}", "tracking.log_model=true"],
        ["data.root=/tmp/xxx", "File name too long"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_override(case, tmp_path, mnist_dir, existing_store):
    overrides, expected = CASES[case]
    shutil.copy(existing_store, tmp_path / "mlflow.db")
    before = file_digest(tmp_path / "mlflow.db")
    out = run_cli("mnist_sweep.train", f"data.root={mnist_dir}", *FAST, *overrides, cwd=tmp_path)
    assert_one_paragraph_error(out, expected)
    assert "hunter2" not in out.stderr + out.stdout
    assert file_digest(tmp_path / "mlflow.db") == before


@pytest.mark.parametrize("how,expected", [("missing", ["download=false", "t10k-labels-idx1-ubyte"]),
                                          ("magic", ["magic number", "t10k-images-idx3-ubyte"]),
                                          ("truncated", ["truncated", "t10k-images-idx3-ubyte"])])
def test_bad_data_folder(how, expected, tmp_path, mnist_dir, existing_store):
    root = tmp_path / "empty" if how == "missing" else corrupt_copy(tmp_path, mnist_dir, how)
    root.mkdir(exist_ok=True)
    shutil.copy(existing_store, tmp_path / "mlflow.db")
    before = file_digest(tmp_path / "mlflow.db")
    out = run_cli("mnist_sweep.train", f"data.root={root}", "data.download=false", *FAST,
                  cwd=tmp_path)
    assert_one_paragraph_error(out, expected)
    assert file_digest(tmp_path / "mlflow.db") == before


def test_debug_flag_shows_the_traceback(tmp_path, mnist_dir):
    out = run_cli("mnist_sweep.train", f"data.root={mnist_dir}", *FAST, "optim.lr=0",
                  "debug=true", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_failed_download_names_the_folder_and_files(tmp_path, monkeypatch):
    import torchvision.datasets

    from mnist_sweep.trial import data
    from mnist_sweep.base.errors import DataError

    # Point torchvision at a closed local port: the same failure as no network, without one.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError) as info:
        data.find_or_download(tmp_path, "mnist", allow_download=True)
    assert "download failed" in str(info.value) and "train-images-idx3-ubyte" in str(info.value)


def assert_one_paragraph_error(out, expected):
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip() and "mlflow.store.db" not in l]
    assert lines and lines[0].startswith("error: "), out.stderr
    assert all(l.startswith("       ") for l in lines[1:]), out.stderr  # one wrapped paragraph
    message = " ".join(l.strip() for l in lines)
    for text in expected:  # a substring, or a pattern where other content may sit between
        found = text.search(message) if isinstance(text, re.Pattern) else text in message
        assert found, (text, message)
