"""backbones/files.py: what reading refuses (pickled code, NaN/inf, not weights) and
what writing keeps (the umask; a full disk named by the file it was writing)."""

from __future__ import annotations

import errno
import os
import pickle
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backbones import WeightsError, create
from backbones.files import atomic_path, read_state_dict, save_safetensors
from zootrain.checkpoints import AtomicCheckpointIO


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mknod, (str(self.marker),)


def test_pickled_code_is_named_and_never_run(tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "weights.pth"
    torch.save({"stem.conv.weight": torch.zeros(1), "hook": Payload(marker)}, path)
    with pytest.raises(
        WeightsError, match=r"weights\.pth holds pickled code, not loaded: it names posix\.mknod"
    ):
        create("resnet18", pretrained=path)
    assert not marker.exists()


def test_a_plain_pickle_is_named_and_never_run(tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "model.pth"
    path.write_bytes(pickle.dumps({"stem.conv.weight": Payload(marker)}))
    with pytest.raises(
        WeightsError,
        match=r"model\.pth is a pickle \(pickle\.dump, or torch\.save's legacy format\)",
    ):
        create("resnet18", pretrained=path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt"])
def test_a_text_file_is_not_weights(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"notes{suffix}"
    path.write_text("learning rate 0.1 worked best\n")
    with pytest.raises(WeightsError, match=rf"notes\{suffix} is not a readable PyTorch checkpoint"):
        create("resnet18", pretrained=path)


@pytest.fixture(scope="module")
def poisoned() -> dict[str, torch.Tensor]:
    """resnet18's weights with NaN in two tensors and inf in one."""
    weights = create("resnet18", out_features=("C5",)).state_dict()
    weights["stem.conv.weight"][0, 0, 0, 0] = float("nan")
    weights["stages.3.1.conv2.conv.weight"][1, 2, 0, 0] = float("-inf")
    weights["stages.0.0.conv1.norm.running_var"][3] = float("nan")
    return weights


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_finite_weights_are_refused_by_name(
    suffix: str, poisoned: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / f"diverged{suffix}"
    if suffix == ".pth":
        torch.save(poisoned, path)
    else:
        save_file(poisoned, path)
    with pytest.raises(WeightsError) as info:
        create("resnet18", pretrained=path)
    message = str(info.value)
    assert message.startswith(f"{path} holds NaN or infinite values in 3 tensor(s): ")
    for name in ("stem.conv.weight", "stages.0.0.conv1.norm.running_var", "stages.3.1.conv2"):
        assert name in message, name
    assert "allow_non_finite=True" in message
    # asked for: they load as they are
    model = create("resnet18", pretrained=read_state_dict(path, allow_non_finite=True))
    assert model.stem.conv.weight[0, 0, 0, 0].isnan()


def test_non_finite_names_are_capped(tmp_path: Path) -> None:
    weights = {f"w{i}": torch.full((2,), float("nan")) for i in range(9)}
    torch.save(weights, tmp_path / "nan.pth")
    with pytest.raises(
        WeightsError, match=r"in 9 tensor\(s\): w0, w1, w2, w3, w4, w5, \.\.\. \(3 more\)"
    ):
        read_state_dict(tmp_path / "nan.pth")


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_written_files_keep_the_umask(umask: int, tmp_path: Path) -> None:
    """As `open` would make them: 0644 under umask 022 (mkstemp alone gives 0600)."""
    with atomic_path(tmp_path / "config.yaml") as tmp:
        tmp.write_text("seed: 0\n")
    save_safetensors({"w": torch.zeros(2)}, tmp_path / "backbone.safetensors")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
    for name in ("config.yaml", "backbone.safetensors", "last.ckpt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


class FullDisk:
    """A file on a disk that fills after 4 KiB."""

    def __init__(self, path: Path, mode: str) -> None:
        self.written = 0

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *args) -> None:
        pass

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    def flush(self) -> None:
        pass


def test_a_full_disk_names_the_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's writer turns the failed write into "unexpected pos"; the OSError comes back."""
    from zootrain import checkpoints

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, path)
    monkeypatch.setattr(checkpoints, "open", FullDisk, raising=False)
    with pytest.raises(OSError) as info:
        AtomicCheckpointIO().save_checkpoint({"epoch": 2, "w": torch.zeros(10_000)}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert torch.load(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left


def test_users_names_still_import_from_weights() -> None:
    """README and docs showed `backbones.weights.WeightsError` / `.read_state_dict`."""
    from backbones import weights

    assert weights.WeightsError is WeightsError and weights.read_state_dict is read_state_dict
