"""CIFAR-10/100 data on tiny fake batches in torchvision's python layout: hold-out, errors,
download, md5 checks and an unpickler that runs no code."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from zootrain.data import cifar
from zootrain.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from zootrain.errors import DatasetError
from zootrain.report import user_errors


def make_cifar(root: Path, hundred: bool = False, per_batch: int = 4) -> Path:
    classes = [f"class_{k}" for k in range(100 if hundred else 10)]
    label_key = "fine_labels" if hundred else "labels"
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    batches = (
        ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    )
    rng = np.random.default_rng(0)
    for b, name in enumerate(batches):
        labels = [(b * per_batch + i) % len(classes) for i in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as file:
            pickle.dump({"data": data, label_key: labels}, file)
    meta_name, meta_key = (
        ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    )
    with open(folder / meta_name, "wb") as file:
        pickle.dump({meta_key: classes}, file)
    return root


def checksums(root: Path) -> dict[str, str]:
    """The md5 of every file of the fake dataset under root (torchvision's are the real ones')."""
    files = [p for p in root.glob("cifar-*/*") if p.is_file()]
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("module", [CIFAR10DataModule, CIFAR100DataModule])
def test_cifar_batches_and_holdout(module: type[CIFAR10DataModule], tmp_path: Path) -> None:
    hundred = module is CIFAR100DataModule
    root = make_cifar(tmp_path, hundred=hundred)
    classes = 100 if hundred else 10
    train_size = 4 if hundred else 20
    sums = checksums(root)
    datamodule = module("classification", root, batch_size=3, val_fraction=0.25, checksums=sums)
    assert datamodule.num_classes == classes and datamodule.class_names[3] == "class_3"
    datamodule.setup("fit")
    held = round(0.25 * train_size)
    assert [len(datamodule.splits[s]) for s in ("train", "val", "test")] == [
        train_size - held,
        held,
        4,
    ]
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < classes
    # The held-out images are training images, seeded: the same split every time.
    again = module("classification", root, val_fraction=0.25, checksums=sums)
    again.setup("fit")
    assert datamodule.splits["val"].indices == again.splits["val"].indices
    assert not set(datamodule.splits["val"].indices) & set(datamodule.splits["train"].indices)

    on_test = module("classification", root, val_fraction=0.0, checksums=sums)
    on_test.setup("fit")
    assert on_test.splits["val"].dataset is on_test.splits["test"].dataset


def test_cifar_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DatasetError) as info:
        CIFAR10DataModule("classification", tmp_path / "none").prepare_data()
    message = str(info.value)
    assert "no CIFAR-10 at data.root" in message and "cifar-10-batches-py/" in message
    assert "data_batch_1 ... data_batch_5, test_batch, batches.meta" in message
    assert "data.download=true" in message and "Dataset not found" not in message
    with pytest.raises(SystemExit) as exited, user_errors():  # what train.py's main does
        CIFAR10DataModule("classification", tmp_path / "none").prepare_data()
    assert exited.value.code == 1
    assert "error: no CIFAR-10 at data.root" in capsys.readouterr().err

    root = make_cifar(tmp_path / "c10")
    with pytest.raises(DatasetError, match=f"points inside the dataset: try data.root={root}"):
        CIFAR10DataModule("classification", root / "cifar-10-batches-py").prepare_data()

    sums = checksums(root)
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"truncated")
    with pytest.raises(DatasetError, match="data_batch_2 fails its md5 check"):
        CIFAR10DataModule("classification", root, checksums=sums).setup()
    with pytest.raises(DatasetError, match=r"cannot read the CIFAR-10 file .*data_batch_2"):
        CIFAR10DataModule("classification", root, checksums=checksums(root)).setup()

    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        CIFAR10DataModule("classification", root, val_fraction=1.5)
    with pytest.raises(
        ValueError, match="serves the tasks \\['classification'\\], not 'segmentation'"
    ):
        CIFAR10DataModule("segmentation", root)


def test_download_flag_uses_torchvision_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`download=true` goes through torchvision's download (here writing a fake copy), which
    checks the archive's md5; then every file is checked against the table."""
    calls = []

    def fake_download(url: str, root: Path, filename: str, md5: str) -> None:
        calls.append((url, filename, md5))
        make_cifar(Path(root))

    monkeypatch.setattr(cifar, "download_and_extract_archive", fake_download)
    datamodule = CIFAR10DataModule("classification", tmp_path, download=True)
    with pytest.raises(DatasetError, match="fails its md5 check"):  # torchvision's md5s
        datamodule.setup()
    assert calls == [
        (cifar.datasets.CIFAR10.url, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
    ]
    fake = CIFAR10DataModule(
        "classification", tmp_path, download=True, checksums=checksums(tmp_path)
    )
    assert fake.num_classes == 10 and len(calls) == 1  # present: not downloaded again

    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DatasetError, match="only local rank 0 downloads"):
        CIFAR10DataModule("classification", tmp_path / "other", download=True).prepare_data()


def test_default_checksums_are_torchvision_s(tmp_path: Path) -> None:
    datamodule = CIFAR100DataModule("classification", tmp_path)
    assert datamodule.checksums == {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    }


def test_md5_is_checked_before_anything_is_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_cifar(tmp_path)
    unpickled = []
    monkeypatch.setattr(cifar, "read_batch", lambda path: unpickled.append(path))
    datamodule = CIFAR10DataModule("classification", root)  # torchvision's md5s
    with pytest.raises(DatasetError) as info:
        _ = datamodule.num_classes
    message = str(info.value)
    assert "data_batch_1 fails its md5 check (expected c99cafc152244af753f735de768cd75f" in message
    assert "and was not read" in message and "data.download=true" in message
    assert unpickled == []


class Payload:
    """A pickle that runs code when unpickled: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mknod, (str(self.marker),)


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_3"])
def test_code_in_a_file_with_a_matching_checksum_never_runs(name: str, tmp_path: Path) -> None:
    root = make_cifar(tmp_path / "c10")
    marker = tmp_path / "pwned"
    with open(root / "cifar-10-batches-py" / name, "wb") as file:
        pickle.dump({"label_names": Payload(marker), "data": Payload(marker)}, file)
    datamodule = CIFAR10DataModule("classification", root, checksums=checksums(root))
    with pytest.raises(DatasetError, match=rf"{name} \(it names posix.mknod, which is not CIFAR"):
        datamodule.setup()
    assert not marker.exists()


def test_offline_download_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """No network: torchvision's download fails to resolve the host (urllib's URLError)."""

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(SystemExit) as exited, user_errors():
        CIFAR10DataModule("classification", tmp_path, download=True).prepare_data()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-10: data.download=true could not download it into")
    assert "Temporary failure in name resolution" in err and "Is this machine offline?" in err
    assert len(err.splitlines()) == 1
