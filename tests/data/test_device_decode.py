"""data.decode=device on the CPU: workers pass JPEG bytes and their drawn crops, the batch is
decoded where it is sent (libjpeg-turbo here, nvJPEG on CUDA), the same pixels as decode=worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from zootrain.build import build_datamodule
from zootrain.data.imagefolder import ImageFolderDataModule
from zootrain.data.transforms import EncodedImages
from zootrain.errors import ConfigError, DatasetError
from zootrain.report import is_user_error, user_message

from .helpers import config, fast_dev_run, natural, save_image
from .test_imagefolder import make_imagefolder


def make_photos(root: Path) -> Path:
    """train/ and val/ of two classes: JPEG photographs of several sizes (colour, 4:2:0 and
    4:4:4, progressive, greyscale) and a PNG, which is decoded in the worker."""
    for split in ("train", "val"):
        for c, label in enumerate(("a", "b")):
            for i in range(5):
                path = root / split / label / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                photo = Image.fromarray(natural(40 + 13 * i, 90 - 9 * i, seed=i + 10 * c))
                if i == 3:
                    photo = photo.convert("L")
                photo.save(path, quality=90, subsampling=0 if i == 1 else 2, progressive=i == 2)
        save_image(root / split / "a" / "5.png", (37, 29))
    return root


def batches(datamodule: ImageFolderDataModule, split: str) -> list[tuple[object, torch.Tensor]]:
    loader = getattr(datamodule, f"{split}_dataloader")()
    if split == "train":
        loader.sampler.set_epoch(3)
    return list(loader)


@pytest.mark.parametrize("split", ["train", "val"])
def test_device_batches_are_the_worker_batches(tmp_path: Path, split: str) -> None:
    """The same seed draws the same crops and flips from the header's size; decoding and the
    geometry run on the batch's device (the CPU here): 0 grey levels apart, measured."""
    root = make_photos(tmp_path / "data")
    modules = {
        decode: ImageFolderDataModule(
            "classification", root, image_size=24, batch_size=4, num_workers=0, decode=decode
        )
        for decode in ("worker", "device")
    }
    for datamodule in modules.values():
        datamodule.setup()
    worker, device = (batches(modules[d], split) for d in ("worker", "device"))
    assert len(worker) == len(device) >= 2
    for (expected, labels), (encoded, device_labels) in zip(worker, device, strict=True):
        assert isinstance(encoded, EncodedImages) and torch.equal(labels, device_labels)
        # the batch's JPEG files whole, one after another; the PNG done in a worker
        sizes, paths = encoded.params[:, 0].tolist(), encoded.paths
        jpegs = [Path(path).read_bytes() for path, size in zip(paths, sizes, strict=True) if size]
        assert encoded.data.numpy().tobytes() == b"".join(jpegs)
        assert len(encoded.done) == sizes.count(0) == paths.count("")
        assert all(image.shape == expected.shape[1:] for image in encoded.done)
        images = encoded.to("cpu").decode()
        assert images.dtype == torch.uint8 and images.shape == expected.shape
        assert (images.int() - expected.int()).abs().max().item() == 0
    # `[index]` gives the worker path's sample, for the pictures and the model summary
    if split == "val":
        image, label = modules["device"].splits["val"][2]
        expected, expected_label = modules["worker"].splits["val"][2]
        assert torch.equal(image, expected) and label == expected_label


def test_a_worker_process_sends_the_encoded_batch(tmp_path: Path) -> None:
    """With DataLoader processes the batch is pickled to the training process: the same one."""
    root = make_photos(tmp_path / "data")
    datamodule = ImageFolderDataModule(
        "classification", root, image_size=24, batch_size=4, num_workers=1, decode="device"
    )
    datamodule.setup()
    inline = ImageFolderDataModule(
        "classification", root, image_size=24, batch_size=4, num_workers=0, decode="device"
    )
    inline.setup()
    (sent, labels), (kept, kept_labels) = (
        batches(datamodule, "train")[0],
        batches(inline, "train")[0],
    )
    assert torch.equal(sent.params, kept.params) and torch.equal(labels, kept_labels)
    assert torch.equal(sent.data, kept.data) and sent.paths == kept.paths
    assert torch.equal(sent.to("cpu").decode(), kept.to("cpu").decode())


def test_a_damaged_jpeg_is_named_when_its_batch_is_decoded(tmp_path: Path) -> None:
    """A JPEG whose header reads but whose data is cut short passes the worker and fails on the
    device: it is then read on the host, where PIL names it, as on the worker path. One cut
    inside its header is named by the worker."""
    root = make_photos(tmp_path / "data")
    cut = root / "val" / "a" / "0.jpg"
    cut.write_bytes(cut.read_bytes()[:-100])
    datamodule = ImageFolderDataModule(
        "classification", root, image_size=24, batch_size=4, num_workers=0, decode="device"
    )
    datamodule.setup()
    encoded, _ = batches(datamodule, "val")[0]
    with pytest.raises(DatasetError, match=rf"cannot decode the image {cut} \(OSError: "):
        encoded.to("cpu").decode()
    cut.write_bytes(cut.read_bytes()[:20])
    with pytest.raises(DatasetError, match=rf"cannot decode the image {cut} \("):
        batches(datamodule, "val")


def test_bad_settings_are_refused_in_one_line(tmp_path: Path) -> None:
    root = make_photos(tmp_path / "data")
    with pytest.raises(ConfigError) as info:
        ImageFolderDataModule("classification", root, decode="gpu")
    assert str(info.value) == "data.decode must be 'worker' or 'device', got 'gpu'"
    with pytest.raises(ConfigError, match=r"needs data\.verify_files=true") as info:
        ImageFolderDataModule("classification", root, decode="device", skip_bad_files=True)
    assert "\n" not in str(info.value)
    ImageFolderDataModule(
        "classification", root, decode="device", skip_bad_files=True, verify_files=True
    )
    cfg = config(tmp_path, "data=imagefolder", f"data.root={root}")
    assert cfg.data.decode == "worker"  # today's behaviour stays the default
    cfg = config(tmp_path, "data=imagefolder", f"data.root={root}", "data.decode=gpu")
    with pytest.raises(Exception) as info:  # Hydra wraps it; the run prints its one line
        build_datamodule(cfg)
    assert is_user_error(info.value)
    message = user_message(info.value)
    assert message.endswith("data.decode must be 'worker' or 'device', got 'gpu'"), message
    assert "\n" not in message


@pytest.mark.slow
def test_fast_dev_run_decodes_on_the_device(tmp_path: Path, monkeypatch) -> None:
    decoded = []
    decode = EncodedImages.decode
    monkeypatch.setattr(EncodedImages, "decode", lambda self: decoded.append(1) or decode(self))
    root = make_imagefolder(tmp_path / "data")
    metrics = fast_dev_run(
        tmp_path, "data=imagefolder", f"data.root={root}", "data.image_size=32",
        "data.batch_size=4", "data.decode=device",
    )  # fmt: skip
    assert {"train/loss_epoch", "val/acc", "val/f1"} <= set(metrics)
    assert len(decoded) >= 2  # a training and a validation batch at least


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")
def test_nvjpeg_decodes_close_to_libjpeg_turbo(tmp_path: Path) -> None:
    """Not run so far (no GPU was available): nvJPEG's IDCT and chroma upsampling, and the
    float resize on CUDA, may differ from the CPU's by a few grey levels; the bound is a guess."""
    root = make_photos(tmp_path / "data")
    datamodule = ImageFolderDataModule(
        "classification", root, image_size=24, batch_size=4, num_workers=0, decode="device"
    )
    datamodule.setup()
    for split in ("train", "val"):
        for encoded, _ in batches(datamodule, split):
            on_cpu = encoded.to("cpu").decode()
            on_cuda = encoded.to("cuda").decode()
            assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.uint8
            difference = (on_cuda.cpu().float() - on_cpu.float()).abs()
            assert difference.mean().item() < 2.0, difference.max().item()
