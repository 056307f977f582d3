"""Real-dataset data modules on tiny fake copies in each library's on-disk layout (no download)."""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict
from PIL import Image

import train as train_script
from backbones import IMAGENET_MEAN, IMAGENET_STD, input_normalization, list_backbones
from training.build import build_datamodule
from training.datasets import (
    _CIFAR10,
    CIFAR10DataModule,
    CIFAR100DataModule,
    COCODetectionDataModule,
    DatasetError,
    ImageFolderDataModule,
    OxfordPetDataModule,
    VOCSegmentationDataModule,
)
from training.report import user_errors
from training.shapes import IGNORE_INDEX

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
RED, BLUE = (230, 20, 20), (20, 20, 230)


def config(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.outputs = str(tmp_path / "outputs")
        cfg.paths.output_dir = str(tmp_path / "outputs" / "run")
    return cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def save_image(
    path: Path, size: tuple[int, int], colour=RED, box=None, background=BLUE, exact=False
) -> None:
    """An RGB image (width, height) of `background` with `colour` inside box (x0, y0, x1, y1).

    `exact` stores PNG data whatever the suffix (PIL reads by content): no JPEG colour bleed,
    so tests can check that labels and pixels stay aligned to the pixel.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = background
    x0, y0, x1, y1 = box or (0, 0, *size)
    pixels[y0:y1, x0:x1] = colour
    Image.fromarray(pixels).save(path, format="PNG" if exact else None)


def save_mask(path: Path, size: tuple[int, int], values: dict[tuple[int, ...], int], fill: int):
    """A class-map PNG: `fill` everywhere, `value` inside each box (later boxes on top)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.full((size[1], size[0]), fill, dtype=np.uint8)
    for (x0, y0, x1, y1), value in values.items():
        mask[y0:y1, x0:x1] = value
    Image.fromarray(mask).save(path)


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * STD + MEAN  # (3, H, W) back in [0, 1]


def interior(region: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: the pixels of `region` whose 8 neighbours are in it too (edges blur)."""
    eroded = -torch.nn.functional.max_pool2d(-region[None].float(), 3, stride=1, padding=1)
    return eroded[0] > 0.5


def dilate(region: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: `region` grown by one pixel."""
    return torch.nn.functional.max_pool2d(region[None].float(), 3, stride=1, padding=1)[0] > 0.5


def is_red(image: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: the pixels that are the object colour (red), not background blue or padding."""
    rgb = unnormalise(image)
    return (rgb[0] > 0.6) & (rgb[2] < 0.4)


# ---------------------------------------------------------------------------------- fake data


def make_imagefolder(root: Path, test: bool = False) -> Path:
    """train/{cat,dog}: 3 images each, 8x8 to 32x32, PNG and JPEG; val/ (and test/) 2 each."""
    for split, count in [("train", 3), ("val", 2)] + ([("test", 2)] if test else []):
        for c, name in enumerate(("cat", "dog")):
            for i in range(count):
                size = (8 + 12 * i, 32 - 8 * i)
                suffix = "png" if i % 2 else "jpg"
                save_image(root / split / name / f"{i}.{suffix}", size, RED if c else BLUE)
    return root


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


PET_BREEDS = ("Abyssinian", "american_bulldog", "Bengal")


def make_pet(root: Path) -> Path:
    """3 breeds x (2 trainval + 1 test) images; each pet a red square with a trimap border."""
    base = root / "oxford-iiit-pet"
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for label, breed in enumerate(PET_BREEDS, start=1):
        for i in range(3):
            image_id = f"{breed}_{i + 1}"
            split = "test" if i == 2 else "trainval"
            species = 1 if breed[0].isupper() else 2  # cats are capitalised in the real set
            lines[split].append(f"{image_id} {label} {species} {label}")
            size, pet = (40 + 8 * i, 36), (10, 8, 30, 28)
            save_image(base / "images" / f"{image_id}.jpg", size, box=pet, exact=True)
            border = (pet[0] - 1, pet[1] - 1, pet[2] + 1, pet[3] + 1)
            save_mask(
                base / "annotations" / "trimaps" / f"{image_id}.png",
                size,
                {border: 3, pet: 1},
                fill=2,
            )
    for split, rows in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def make_voc(root: Path) -> Path:
    """3 train + 2 val images, 40x30; a 'person' (15) square outlined with 255."""
    base = root / "VOCdevkit" / "VOC2012"
    ids = {
        "train": ["2007_000001", "2007_000002", "2007_000003"],
        "val": ["2008_000001", "2008_000002"],
    }
    for split, names in ids.items():
        for name in names:
            obj = (8, 6, 28, 24)
            save_image(base / "JPEGImages" / f"{name}.jpg", (40, 30), box=obj, exact=True)
            outline = (obj[0] - 1, obj[1] - 1, obj[2] + 1, obj[3] + 1)
            path = base / "SegmentationClass" / f"{name}.png"
            save_mask(path, (40, 30), {outline: 255, obj: 15}, fill=0)
            mask = Image.open(path).convert("P")  # VOC's masks are palette images
            mask.save(path)
        lists = base / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


COCO_CATEGORIES = [  # ids with gaps, as in COCO, listed out of order
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def make_coco(root: Path) -> Path:
    """Per split: two images with red boxes (one also with a crowd region), one with none."""
    for split in ("train", "val"):
        images, annotations = [], []
        for i in range(3):
            name = f"{i:012d}.jpg"
            size = (48 + 8 * i, 40)
            box = (6 + 4 * i, 8, 30 + 4 * i, 32) if i < 2 else None
            save_image(
                root / f"{split}2017" / name,
                size,
                colour=RED if box else (20, 20, 20),  # the third image: nothing on it
                box=box,
                background=(20, 20, 20),
                exact=True,
            )
            images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1]})
            if box is not None:
                x0, y0, x1, y1 = box
                bbox = [x0, y0, x1 - x0, y1 - y0]
                category = (1, 18)[i]
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                     "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, "segmentation": []}
                )  # fmt: skip
            if i == 1:
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": i + 1, "category_id": 90,
                     "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 1,
                     "segmentation": {"counts": [0, 16], "size": [40, size[0]]}}
                )  # fmt: skip
        folder = root / "annotations"
        folder.mkdir(parents=True, exist_ok=True)
        content = {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
        (folder / f"instances_{split}2017.json").write_text(json.dumps(content))
    return root


# ---------------------------------------------------------------------------------- registry / configs


def test_every_backbone_has_input_normalization() -> None:
    for name in list_backbones():
        mean, std = input_normalization(name)
        assert len(mean) == len(std) == 3, name
        assert all(0 < v < 1 for v in (*mean, *std)), name
    assert input_normalization("resnet18") == (IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        input_normalization("resnet19")


@pytest.mark.parametrize("data", options("data"))
def test_every_data_config_composes_with_its_heads(data: str, tmp_path: Path) -> None:
    """Each data config builds (without touching its root) for every head of a task it serves,
    and refuses the others by naming the tasks it serves."""
    heads = {head: config(tmp_path, f"data={data}", f"head={head}") for head in options("head")}
    tasks = get_class(next(iter(heads.values())).data._target_).tasks
    served = [head for head, cfg in heads.items() if cfg.head.task in tasks]
    if not served:
        pytest.skip(f"no head config on this branch serves {tasks}")  # detection heads: issue 7B
    for head, cfg in heads.items():
        if head in served:
            datamodule = build_datamodule(cfg)
            assert datamodule.task == cfg.head.task
            if hasattr(datamodule, "mean"):  # real data: the backbone's statistics
                assert (datamodule.mean, datamodule.std) == input_normalization("resnet18")
        else:
            with pytest.raises(Exception, match=r"serves the tasks"):
                build_datamodule(cfg)


def test_oxford_pet_serves_classification_and_segmentation(tmp_path: Path) -> None:
    root = make_pet(tmp_path / "pet")
    for head, names in [("classification", ["Abyssinian", "American Bulldog", "Bengal"]),
                        ("fpn", ["background", "pet"])]:  # fmt: skip
        cfg = config(tmp_path, "data=oxford_pet", f"head={head}", f"data.root={root}")
        assert build_datamodule(cfg).class_names == names


# ---------------------------------------------------------------------------------- ImageFolder


def test_imagefolder_batches(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data")
    datamodule = ImageFolderDataModule("classification", root, image_size=16, batch_size=4)
    assert datamodule.class_names == ["cat", "dog"] and datamodule.num_classes == 2
    datamodule.setup("fit")
    assert datamodule.test_split == "val"  # no test/ folder: tested on val
    assert [len(datamodule.splits[s]) for s in ("train", "val", "test")] == [6, 4, 4]
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    # eval: every pixel is the class colour, normalised with ImageNet statistics
    images, labels = next(iter(datamodule.val_dataloader()))
    for image, label in zip(images, labels, strict=True):
        expected = torch.tensor(RED if label else BLUE).view(3, 1, 1) / 255
        assert torch.allclose(unnormalise(image), expected.expand_as(image), atol=0.03)

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


def test_imagefolder_bad_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_imagefolder(tmp_path / "data")
    notes = root / "train" / "cat" / "notes.txt"
    notes.write_text("not an image")
    cut = root / "val" / "dog" / "cut.jpg"
    cut.write_bytes((root / "val" / "dog" / "0.jpg").read_bytes()[:20])  # header cut short
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored

    with pytest.raises(DatasetError) as info:
        ImageFolderDataModule("classification", root).setup()
    message = str(info.value)
    assert "2 file(s) under" in message and "data.skip_bad_files=true" in message
    assert f"{notes}: UnidentifiedImageError" in message and f"{cut}: " in message

    datamodule = ImageFolderDataModule("classification", root, skip_bad_files=True)
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        datamodule.setup()
    assert "skipping 2 unreadable file(s)" in caplog.text and str(notes) in caplog.text
    assert [len(datamodule.splits[s]) for s in ("train", "val")] == [6, 4]

    # every image of a class unreadable: named, even when skipping
    for path in (root / "val" / "cat").iterdir():
        path.write_bytes(b"junk")
    with pytest.raises(
        DatasetError, match=r"data/val has no readable image for the classes \['cat'\]"
    ):
        ImageFolderDataModule("classification", root, skip_bad_files=True).setup()


FAST_DEV_RUN = [
    "data.num_workers=0",
    "callbacks=none",
    "trainer.accelerator=cpu",
    "trainer.fast_dev_run=true",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.mark.slow
def test_fast_dev_run_on_imagefolder(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data")
    cfg = config(
        tmp_path,
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=32",
        "data.batch_size=4",
        *FAST_DEV_RUN,
    )
    result = train_script.train(cfg)
    assert {"train/loss_step", "val/acc", "val/f1"} <= set(result["metrics"])
    assert all(math.isfinite(v) for v in result["metrics"].values())


@pytest.mark.slow
def test_fast_dev_run_of_fcos_on_coco(tmp_path: Path) -> None:
    """The detection head on the COCO data module (gapped ids, a crowd box, an empty image)."""
    root = make_coco(tmp_path / "data")
    cfg = config(
        tmp_path,
        "head=fcos",
        "head.model.fpn_channels=32",
        "data=coco",
        f"data.root={root}",
        "data.image_size=32",
        "data.batch_size=3",
        *FAST_DEV_RUN,
    )
    result = train_script.train(cfg)
    assert {"train/loss_step", "val/map", "val/map_50"} <= set(result["metrics"])
    assert all(math.isfinite(v) for v in result["metrics"].values())


# ---------------------------------------------------------------------------------- CIFAR


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


# ---------------------------------------------------------------------------------- Oxford Pet


def test_pet_classification(tmp_path: Path) -> None:
    datamodule = OxfordPetDataModule(
        "classification", make_pet(tmp_path), image_size=16, batch_size=2
    )
    assert datamodule.class_names == ["Abyssinian", "American Bulldog", "Bengal"]
    datamodule.setup("fit")
    assert [len(datamodule.splits[s]) for s in ("train", "val", "test")] == [5, 1, 3]
    images, labels = next(iter(datamodule.test_dataloader()))
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 1]


def test_pet_segmentation_masks_move_with_the_image(tmp_path: Path) -> None:
    torch.manual_seed(0)
    datamodule = OxfordPetDataModule(
        "segmentation", make_pet(tmp_path), image_size=32, batch_size=5
    )
    datamodule.setup("fit")
    images, masks = next(iter(datamodule.train_dataloader()))
    assert images.shape == (5, 3, 32, 32) and masks.shape == (5, 32, 32)
    assert masks.dtype == torch.int64 and set(masks.unique().tolist()) <= {0, 1, IGNORE_INDEX}
    seen = 0
    for _ in range(4):  # random scale, crop and flip: the pet pixels stay labelled pet
        for image, mask in zip(*next(iter(datamodule.train_dataloader())), strict=True):
            pet, background, red = interior(mask == 1), interior(mask == 0), is_red(image)
            assert red[pet].all() and not red[background].any()
            seen += int(pet.any() and background.any())
    assert seen >= 10  # most crops hold both
    images, masks = next(iter(datamodule.val_dataloader()))
    # eval: the longer side (width) resized to 32, the image then padded at the bottom
    padded = (unnormalise(images[0]) < 0.02).all(0)
    assert masks.shape == (1, 32, 32) and padded[-1].all() and not padded[0].any()
    assert (masks[0][padded] == IGNORE_INDEX).all()


def test_pet_missing_files_are_named(tmp_path: Path) -> None:
    root = make_pet(tmp_path)
    (root / "oxford-iiit-pet" / "annotations" / "trimaps" / "Bengal_3.png").unlink()
    OxfordPetDataModule("classification", root).setup()  # classification needs no trimaps
    with pytest.raises(
        DatasetError, match=r"1 of the 6 files listed in .*test.txt are missing: .*Bengal_3.png"
    ):
        OxfordPetDataModule("segmentation", root).setup()
    with pytest.raises(
        DatasetError, match=r"oxford-iiit-pet/images is missing(.|\n)*data.download=true"
    ):
        OxfordPetDataModule("classification", tmp_path / "empty").setup()


# ---------------------------------------------------------------------------------- VOC


def test_voc_segmentation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    root = make_voc(tmp_path)
    datamodule = VOCSegmentationDataModule("segmentation", root, image_size=32, batch_size=3)
    assert datamodule.num_classes == 21 and datamodule.class_names[15] == "person"
    datamodule.setup("fit")
    assert datamodule.test_split == "val"
    for _ in range(4):
        images, masks = next(iter(datamodule.train_dataloader()))
        assert images.shape == (3, 3, 32, 32) and masks.shape == (3, 32, 32)
        assert set(masks.unique().tolist()) <= {0, 15, IGNORE_INDEX}
        for image, mask in zip(images, masks, strict=True):
            person, background, red = interior(mask == 15), interior(mask == 0), is_red(image)
            assert red[person].all() and not red[background].any()
            # crop padding (image smaller than the crop) is ignored, never background
            padded = (unnormalise(image) < 0.02).all(0)
            assert (mask[padded] == IGNORE_INDEX).all()
    images, masks = next(iter(datamodule.val_dataloader()))
    # eval: longer side 40 -> 32, so 30 -> 24 rows; rows 24.. are padding
    assert images.shape == (2, 3, 32, 32) and (masks[:, 24:] == IGNORE_INDEX).all()
    assert (masks[:, :24] != IGNORE_INDEX).float().mean() > 0.8


def test_voc_layout_errors(tmp_path: Path) -> None:
    root = make_voc(tmp_path)
    with pytest.raises(DatasetError, match=f"points inside the dataset: try data.root={root}"):
        VOCSegmentationDataModule("segmentation", root / "VOCdevkit" / "VOC2012").setup()
    (root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 4 files listed in .*val.txt are missing"):
        VOCSegmentationDataModule("segmentation", root).setup()


# ---------------------------------------------------------------------------------- COCO


def test_coco_detection_targets(tmp_path: Path) -> None:
    torch.manual_seed(0)
    root = make_coco(tmp_path)
    datamodule = COCODetectionDataModule("detection", root, image_size=32, batch_size=3)
    assert datamodule.class_names == ["person", "dog", "toothbrush"]  # by category id
    datamodule.setup("fit")
    assert datamodule.test_split == "val"
    images, targets = next(iter(datamodule.val_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 3
    for image, target in zip(images, targets, strict=True):
        assert image.dtype == torch.float32 and max(image.shape[1:]) == 32
        assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
        assert target["labels"].dtype == torch.int64
    # contiguous labels (ids 1, 18 -> 0, 1), the crowd box dropped, the empty image kept
    assert [t["labels"].tolist() for t in targets] == [[0], [1], []]
    assert targets[2]["boxes"].shape == (0, 4)
    for _ in range(6):  # random scale, crop and flip: each box covers its object's pixels
        for image, target in zip(*next(iter(datamodule.train_dataloader())), strict=True):
            red = is_red(image)
            boxed = torch.zeros_like(red)
            for x0, y0, x1, y1 in target["boxes"].round().long().tolist():
                box = torch.zeros_like(red)
                box[y0:y1, x0:x1] = True
                assert red[interior(box)].all()  # the box is on the object ...
                boxed |= box
            # ... and the object is in a box (a sliver under 1 px wide loses its box)
            assert not (interior(red) & ~dilate(boxed)).any()


def test_coco_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        COCODetectionDataModule("detection", tmp_path / "coco", download=True).prepare_data()
    message = str(info.value)
    assert "torchvision cannot download it" in message and "cocodataset.org" in message
    assert "annotations/instances_train2017.json, instances_val2017.json" in message

    root = make_coco(tmp_path / "c")
    (root / "val2017" / "000000000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 3 files listed in .*instances_val2017.json"):
        COCODetectionDataModule("detection", root).setup()
