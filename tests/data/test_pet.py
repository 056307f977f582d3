"""Oxford-IIIT Pet data on a tiny fake copy: breeds, trimap masks that move with the image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zootrain.build import build_datamodule
from zootrain.data.pet import OxfordPetDataModule
from zootrain.errors import DatasetError
from zootrain.tasks import IGNORE_INDEX

from .helpers import config, interior, is_red, rgb, save_image, save_mask

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


def test_oxford_pet_serves_classification_and_segmentation(tmp_path: Path) -> None:
    root = make_pet(tmp_path / "pet")
    for head, names in [("classification", ["Abyssinian", "American Bulldog", "Bengal"]),
                        ("fpn", ["background", "pet"])]:  # fmt: skip
        cfg = config(tmp_path, "data=oxford_pet", f"head={head}", f"data.root={root}")
        assert build_datamodule(cfg).class_names == names


def test_pet_classification(tmp_path: Path) -> None:
    datamodule = OxfordPetDataModule(
        "classification", make_pet(tmp_path), image_size=16, batch_size=2
    )
    assert datamodule.class_names == ["Abyssinian", "American Bulldog", "Bengal"]
    datamodule.setup("fit")
    assert [len(datamodule.splits[s]) for s in ("train", "val", "test")] == [5, 1, 3]
    images, labels = next(iter(datamodule.test_dataloader()))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1]


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
    padded = (rgb(images[0]) < 0.02).all(0)
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
