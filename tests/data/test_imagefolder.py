"""ImageFolder data on tiny fake trees of class folders: batches, layout errors, a listing that
opens no file, damaged files met when read, links, the uint8 path against the float one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from zootrain.data import imagefolder
from zootrain.data.__main__ import main as verify_main
from zootrain.data.imagefolder import ImageFolderDataModule
from zootrain.data.transforms import DeviceNormalize
from zootrain.errors import DatasetError

from .helpers import BLUE, RED, fast_dev_run, natural, rgb, save_image


def make_imagefolder(root: Path, test: bool = False) -> Path:
    """train/{cat,dog}: 3 images each, 8x8 to 32x32, PNG and JPEG; val/ (and test/) 2 each."""
    for split, count in [("train", 3), ("val", 2)] + ([("test", 2)] if test else []):
        for c, name in enumerate(("cat", "dog")):
            for i in range(count):
                size = (8 + 12 * i, 32 - 8 * i)
                suffix = "png" if i % 2 else "jpg"
                save_image(root / split / name / f"{i}.{suffix}", size, RED if c else BLUE)
    return root


def test_imagefolder_batches(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data")
    datamodule = ImageFolderDataModule("classification", root, image_size=16, batch_size=4)
    assert datamodule.class_names == ["cat", "dog"] and datamodule.num_classes == 2
    datamodule.setup("fit")
    assert datamodule.test_split == "val"  # no test/ folder: tested on val
    assert [len(datamodule.splits[s]) for s in ("train", "val", "test")] == [6, 4, 4]
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    # eval: every pixel is the class colour
    images, labels = next(iter(datamodule.val_dataloader()))
    for image, label in zip(images, labels, strict=True):
        expected = torch.tensor(RED if label else BLUE).view(3, 1, 1) / 255
        assert torch.allclose(rgb(image), expected.expand_as(image), atol=0.03)

    with_test = ImageFolderDataModule("classification", make_imagefolder(tmp_path / "t", True))
    with_test.setup("test")
    assert with_test.test_split == "test" and len(with_test.splits["test"]) == 4


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    def error(root: Path) -> str:
        with pytest.raises(DatasetError) as info:
            ImageFolderDataModule("classification", root).setup()
        return str(info.value)

    missing = error(tmp_path / "nowhere")
    assert "nowhere is not a directory" in missing
    assert "train/<class>/<image>" in missing and "val/<class>/<image>" in missing
    assert "Traceback" not in missing

    flat = tmp_path / "flat"
    save_image(flat / "train" / "a.png", (8, 8))
    (flat / "val").mkdir()
    assert "flat/train has no class folders (images must be in train/<class>/)" in error(flat)

    root = make_imagefolder(tmp_path / "data")
    assert f"data.root points at a split: try data.root={root}" in error(root / "train")

    (root / "val" / "dog").rename(root / "val" / "doge")
    assert "missing in val/: ['dog']; missing in train/: ['doge']" in error(root)


def test_listing_opens_no_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Set-up is a directory walk: a damaged file is listed (it is named when read), a file
    without an image suffix is left out with a warning, hidden ones silently."""
    root = make_imagefolder(tmp_path / "data")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    cut = root / "val" / "dog" / "cut.jpg"
    cut.write_bytes((root / "val" / "dog" / "0.jpg").read_bytes()[:20])  # header cut short
    datamodule = ImageFolderDataModule("classification", root)
    with caplog.at_level(logging.WARNING, logger="zootrain.data.imagefolder"):
        datamodule.setup()
    assert "1 file(s) without an image suffix left out: cat/notes.txt" in caplog.text
    assert [len(datamodule.splits[s]) for s in ("train", "val")] == [6, 5]
    files = datamodule.splits["val"].dataset
    assert files.path(4) == str(cut) and files.targets.tolist() == [0, 0, 1, 1, 1]


def test_a_damaged_file_is_named_when_a_batch_reads_it(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data")
    cut = root / "train" / "dog" / "2.jpg"
    cut.write_bytes(cut.read_bytes()[:-100])  # its header reads: it fails when decoded
    datamodule = ImageFolderDataModule("classification", root, image_size=16, batch_size=6)
    datamodule.setup()
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(0)
    with pytest.raises(DatasetError, match=rf"cannot decode the image {cut} \(OSError: "):
        next(iter(loader))


def test_skip_bad_files_reads_the_next_file_in_its_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The replacement is the same in every epoch and process: batches keep their size, and
    the order and augmentations stay those of (seed, epoch, index)."""
    root = make_imagefolder(tmp_path / "data")
    cut = root / "train" / "cat" / "1.png"
    cut.write_bytes(cut.read_bytes()[:40])
    datamodule = ImageFolderDataModule(
        "classification", root, image_size=16, batch_size=6, skip_bad_files=True
    )
    datamodule.setup()
    files = datamodule.splits["train"].dataset
    with caplog.at_level(logging.WARNING, logger="zootrain.data.imagefolder"):
        image, label = files[1]
    assert f"cannot decode the image {cut}" in caplog.text and "takes its place" in caplog.text
    assert torch.equal(image, files[2][0]) and label == files[2][1] == 0
    loader = datamodule.train_dataloader()
    epochs = []
    for _ in range(2):
        loader.sampler.set_epoch(3)
        epochs.append(next(iter(loader)))
    assert epochs[0][0].shape == (6, 3, 16, 16)
    assert torch.equal(epochs[0][0], epochs[1][0]) and torch.equal(epochs[0][1], epochs[1][1])
    for path in (root / "train").rglob("*.*"):  # nothing readable left
        path.write_bytes(b"junk")
    fresh = ImageFolderDataModule("classification", root, skip_bad_files=True)
    fresh.setup()
    with pytest.raises(DatasetError, match=r"no file under .*train is a readable image"):
        fresh.splits["train"].dataset[0]


def test_verify_files_names_every_bad_file_before_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_imagefolder(tmp_path / "data")
    cut = root / "val" / "dog" / "cut.jpg"
    cut.write_bytes((root / "val" / "dog" / "0.jpg").read_bytes()[:20])
    junk = root / "train" / "cat" / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(DatasetError) as info:
        ImageFolderDataModule("classification", root, verify_files=True).setup()
    message = str(info.value)
    assert "2 file(s) under" in message and "data.skip_bad_files=true" in message
    assert f"cannot decode the image {junk} (UnidentifiedImageError" in message
    assert f"cannot decode the image {cut} (" in message

    datamodule = ImageFolderDataModule(
        "classification", root, verify_files=True, skip_bad_files=True
    )
    with caplog.at_level(logging.WARNING, logger="zootrain.data.imagefolder"):
        datamodule.setup()
    assert "skipping 2 unreadable file(s)" in caplog.text and str(junk) in caplog.text
    assert [len(datamodule.splits[s]) for s in ("train", "val")] == [6, 4]  # left out

    # every image of a class unreadable: named, even when skipping
    for path in (root / "val" / "cat").iterdir():
        path.write_bytes(b"junk")
    with pytest.raises(
        DatasetError, match=r"data/val has no readable image for the classes \['cat'\]"
    ):
        ImageFolderDataModule(
            "classification", root, verify_files=True, skip_bad_files=True
        ).setup()


def test_verify_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_imagefolder(tmp_path / "data")
    assert verify_main(["verify", str(root)]) == 0
    assert "all 10 image files under" in capsys.readouterr().out
    cut = root / "train" / "dog" / "2.jpg"
    cut.write_bytes(cut.read_bytes()[:100])
    assert verify_main(["verify", str(root), "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"cannot decode the image {cut} (") and out.count("\n") == 1
    assert "1 of 10 image files under" in err


def test_a_folder_is_listed_once_however_many_links_reach_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Links are followed (a class folder may live elsewhere), but a link back up the tree
    would list every image once per level until the path is too long: each real folder once."""
    root = make_imagefolder(tmp_path / "data")
    cat = root / "train" / "cat"
    (cat / "loop").symlink_to(cat)  # train/cat/loop/loop/loop/...
    (cat / "up").symlink_to(root / "train")  # reaches cat/ and dog/ again
    elsewhere = tmp_path / "more_dogs"
    save_image(elsewhere / "nested" / "4.png", (8, 8))
    (root / "train" / "dog" / "more").symlink_to(elsewhere)
    datamodule = ImageFolderDataModule("classification", root)
    with caplog.at_level(logging.WARNING, logger="zootrain.data.imagefolder"):
        datamodule.setup()
    files = datamodule.splits["train"].dataset
    paths = [files.path(i) for i in range(len(files))]
    assert len(paths) == 7 and len({os.path.realpath(p) for p in paths}) == 7
    assert paths[-1] == str(root / "train" / "dog" / "more" / "nested" / "4.png")
    assert files.targets.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert "2 linked folder(s) lead to folders listed already" in caplog.text


def test_the_listing_is_made_once_per_run_on_rank_zero(tmp_path: Path, monkeypatch) -> None:
    """Under DDP global rank 0 walks the folder and the other ranks receive its listing (or
    its error) through the strategy's broadcast; they never walk it themselves."""
    root = make_imagefolder(tmp_path / "data")
    listed = ImageFolderDataModule("classification", root)
    sent = listed._list_splits()
    walks = []
    list_images = imagefolder.list_images
    monkeypatch.setattr(imagefolder, "list_images", lambda *a: walks.append(a) or list_images(*a))

    def ddp(rank: int, outcome: tuple | None = None) -> ImageFolderDataModule:
        datamodule = ImageFolderDataModule("classification", root)
        received = {}

        def broadcast(obj: object, src: int) -> object:
            received["obj"] = obj
            return obj if rank == 0 else outcome

        strategy = SimpleNamespace(broadcast=broadcast)
        datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=strategy)
        datamodule.received = received
        return datamodule

    other = ddp(rank=1, outcome=(sent, None))
    other.setup()
    assert not walks and len(other.splits["train"]) == 6  # rank 1 read rank 0's listing
    zero = ddp(rank=0)
    zero.setup()
    assert len(walks) == 2 and zero.received["obj"][1] is None  # train and val, sent
    assert zero.received["obj"][0]["train"].files.tolist() == sent["train"].files.tolist()
    failed = ddp(rank=1, outcome=(None, "data/val has no image file for the classes ['cat']"))
    with pytest.raises(DatasetError, match="no image file for the classes"):
        failed.setup()


V2_GEOMETRY = {
    "train": lambda size: [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()],
    "val": lambda size: [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)],
}


def test_the_uint8_path_gives_the_float_pipelines_tensors(tmp_path: Path) -> None:
    """The old reading (PIL, then v2's geometry, ToDtype and Normalize in the worker) and the
    new (decode_jpeg, the same geometry in uint8, normalised on the device) agree to 1e-6 on
    JPEG photographs, augmentations included (the same seed draws the same crops and flips)."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            for i in range(3):
                path = tmp_path / split / label / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                photo = Image.fromarray(natural(45 + 10 * i, 60, seed=i + 10 * (label == "b")))
                photo.save(path, quality=90)
    datamodule = ImageFolderDataModule("classification", tmp_path, image_size=32)
    datamodule.setup()
    normalize = DeviceNormalize(datamodule.mean, datamodule.std)
    for split in ("train", "val"):
        new = datamodule.splits[split]
        geometry = V2_GEOMETRY[split](32)  # what the preset was before it left v2
        old = v2.Compose(
            [v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
             v2.Normalize(datamodule.mean, datamodule.std)]
        )  # fmt: skip
        files = new.dataset
        for index in range(len(new)):
            torch.manual_seed(index)
            image, label = new[index]
            torch.manual_seed(index)
            with Image.open(files.path(index)) as photo:
                expected = old(photo.convert("RGB"))
            assert image.dtype == torch.uint8 and label == files.targets[index]
            torch.testing.assert_close(normalize(image), expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_fast_dev_run_on_imagefolder(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data")
    metrics = fast_dev_run(
        tmp_path, "data=imagefolder", f"data.root={root}", "data.image_size=32", "data.batch_size=4"
    )
    assert {"train/loss_epoch", "val/acc", "val/f1"} <= set(metrics)
