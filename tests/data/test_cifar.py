"""CIFAR-10/100 data on tiny fake batches in torchvision's python layout: hold-out, errors, download."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data.cifar import _CIFAR10, CIFAR10DataModule, CIFAR100DataModule
from training.errors import DatasetError
from training.report import user_errors


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


@pytest.mark.parametrize("module", [CIFAR10DataModule, CIFAR100DataModule])
def test_cifar_batches_and_holdout(module: type[CIFAR10DataModule], tmp_path: Path) -> None:
    hundred = module is CIFAR100DataModule
    root = make_cifar(tmp_path, hundred=hundred)
    classes = 100 if hundred else 10
    train_size = 4 if hundred else 20
    datamodule = module("classification", root, batch_size=3, val_fraction=0.25)
    assert datamodule.num_classes == classes and datamodule.class_names[3] == "class_3"
    datamodule.setup("fit")
    held = round(0.25 * train_size)
    assert [len(datamodule.splits[s]) for s in ("train", "val", "test")] == [
        train_size - held,
        held,
        4,
    ]
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < classes
    # The held-out images are training images, seeded: the same split every time.
    again = module("classification", root, val_fraction=0.25)
    again.setup("fit")
    assert datamodule.splits["val"].indices == again.splits["val"].indices
    assert not set(datamodule.splits["val"].indices) & set(datamodule.splits["train"].indices)

    on_test = module("classification", root, val_fraction=0.0)
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

    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"truncated")
    with pytest.raises(DatasetError, match="cannot read the CIFAR-10 batches"):
        CIFAR10DataModule("classification", root).setup()

    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        CIFAR10DataModule("classification", root, val_fraction=1.5)
    with pytest.raises(
        ValueError, match="serves the tasks \\['classification'\\], not 'segmentation'"
    ):
        CIFAR10DataModule("segmentation", root)


def test_download_flag_uses_torchvision_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`download=true` goes through torchvision's own `download` (here writing a fake copy)."""
    calls = []

    def fake_download(self: _CIFAR10) -> None:
        calls.append(self.root)
        if not (Path(self.root) / self.base_folder).exists():
            make_cifar(Path(self.root))

    monkeypatch.setattr(_CIFAR10, "download", fake_download)
    datamodule = CIFAR10DataModule("classification", tmp_path, download=True)
    assert datamodule.num_classes == 10 and calls == [tmp_path]

    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DatasetError, match="only local rank 0 downloads"):
        CIFAR10DataModule("classification", tmp_path / "other", download=True).prepare_data()
