"""Loading pretrained weights: every supported layout, in_chans adaptation, and every failure."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from backbones import WeightsError, convert, create
from backbones.files import read_state_dict, save_safetensors
from backbones.weights import backbone_part, load_into
from heads import build_classifier

from .conftest import max_rel_error, randomize_norms


class NotATensor:
    """Pickling an instance of this needs code execution to load."""


@pytest.fixture(scope="module")
def tv_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18()).eval()


@pytest.fixture(scope="module")
def tv_backbone(tv_resnet18: nn.Module) -> dict[str, torch.Tensor]:
    """The torchvision weights converted, backbone part, as `create("resnet18")` keys them."""
    return backbone_part(convert("resnet18", tv_resnet18.state_dict()))


@pytest.fixture(scope="module")
def tv_file(tv_resnet18: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(tv_resnet18.state_dict(), path)
    return path


def assert_loaded(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


# ------------------------------------------------------------------------ what loads


def test_torchvision_pth(tv_backbone: dict[str, torch.Tensor], tv_file: Path) -> None:
    model = create("resnet18", pretrained=tv_file)
    assert_loaded(model, tv_backbone)


def test_pretrained_classifier_matches_torchvision(tv_resnet18: nn.Module, tv_file: Path) -> None:
    model = build_classifier("resnet18", pretrained=tv_file).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert max_rel_error(model(x), tv_resnet18(x)) <= 1e-5


def test_timm_safetensors(tmp_path: Path) -> None:
    reference = randomize_norms(timm.create_model("resnet18")).eval()
    path = save_safetensors(reference.state_dict(), tmp_path / "timm_resnet18.safetensors")
    model = create("resnet18", pretrained=path)
    assert_loaded(model, backbone_part(convert("resnet18", reference.state_dict(), source="timm")))


def test_wrapped_checkpoint(
    tv_resnet18: nn.Module, tv_backbone: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # What training scripts save: {"state_dict": ...} with DistributedDataParallel's prefix.
    wrapped = {
        "epoch": 3,
        "state_dict": {f"module.{k}": v for k, v in tv_resnet18.state_dict().items()},
    }
    torch.save(wrapped, tmp_path / "ckpt.pth")
    model = create("resnet18", pretrained=tmp_path / "ckpt.pth")
    assert_loaded(model, tv_backbone)


@pytest.mark.parametrize("layout", ["classifier", "backbone"])
def test_our_own_checkpoints(layout: str, tmp_path: Path) -> None:
    source = randomize_norms(build_classifier("resnet18"))
    state_dict = source.state_dict() if layout == "classifier" else source.backbone.state_dict()
    torch.save(state_dict, tmp_path / "ours.pt")
    model = create("resnet18", pretrained=tmp_path / "ours.pt")
    assert_loaded(model, source.backbone.state_dict())


def test_truncated_backbone_loads_only_its_stages(
    tv_backbone: dict[str, torch.Tensor], tv_file: Path
) -> None:
    model = create("resnet18", pretrained=tv_file, out_features=("C2", "C3"))
    assert_loaded(
        model,
        {k: v for k, v in tv_backbone.items() if not k.startswith(("stages.2.", "stages.3."))},
    )


def test_state_dict_argument(tv_resnet18: nn.Module, tv_backbone: dict[str, torch.Tensor]) -> None:
    model = create("resnet18", pretrained=tv_resnet18.state_dict())
    assert_loaded(model, tv_backbone)


def test_new_num_classes_keeps_the_backbone(
    tv_backbone: dict[str, torch.Tensor], tv_file: Path
) -> None:
    model = build_classifier("resnet18", num_classes=10, pretrained=tv_file)
    assert model.head.fc.out_features == 10
    assert_loaded(model.backbone, tv_backbone)


@pytest.mark.parametrize("in_chans", [1, 2, 6])
def test_in_chans_adapts_the_stem(in_chans: int, tv_file: Path) -> None:
    rgb = create("resnet18", pretrained=tv_file).eval()
    adapted = create("resnet18", pretrained=tv_file, in_chans=in_chans).eval()
    weight, new = rgb.stem.conv.weight, adapted.stem.conv.weight
    assert new.shape == (64, in_chans, 7, 7)
    if in_chans == 1:  # a grey image is an RGB image with equal channels
        torch.testing.assert_close(new, weight.sum(1, keepdim=True))
        grey = torch.randn(1, 1, 64, 64)
        with torch.no_grad():
            assert max_rel_error(adapted(grey)["C5"], rgb(grey.expand(-1, 3, -1, -1))["C5"]) <= 1e-5
    else:  # channels cycle through R, G, B and are scaled by 3 / in_chans
        expected = torch.cat([weight] * 2, dim=1)[:, :in_chans] * (3 / in_chans)
        torch.testing.assert_close(new, expected)
    if in_chans == 6:
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert max_rel_error(adapted(x.repeat(1, 2, 1, 1))["C5"], rgb(x)["C5"]) <= 1e-5


def test_frozen_stages_stay_frozen_after_loading(tv_file: Path) -> None:
    model = create("resnet18", pretrained=tv_file, frozen_stages=1)
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.stages[0].parameters())
    assert all(p.requires_grad for p in model.stages[1].parameters())


def test_download_through_torchvision(
    tv_resnet18: nn.Module, tv_backbone: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand in for the network: torchvision's downloader returns the reference weights.
    urls = []

    def fake_download(url: str, *args, **kwargs) -> dict[str, torch.Tensor]:
        urls.append(url)
        return tv_resnet18.state_dict()

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    model = create("resnet18", pretrained="torchvision")
    assert urls == [torchvision.models.ResNet18_Weights.DEFAULT.url]
    assert_loaded(model, tv_backbone)


# ------------------------------------------------------------------------ what fails


def test_missing_file() -> None:
    with pytest.raises(
        FileNotFoundError, match=r"no weights file at 'nowhere/r18.pth'.*'torchvision', 'timm'"
    ):
        create("resnet18", pretrained="nowhere/r18.pth")


def test_unknown_source_string() -> None:
    with pytest.raises(FileNotFoundError, match="no weights file at 'imagenet'"):
        create("resnet18", pretrained="imagenet")


def test_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "w.npz").write_bytes(b"123")
    with pytest.raises(WeightsError, match=r"unknown weights format '.npz'"):
        create("resnet18", pretrained=tmp_path / "w.npz")


def test_corrupt_pth(tv_file: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tv_file.read_bytes()[:5000])
    with pytest.raises(
        WeightsError, match=r"not a readable PyTorch checkpoint.*truncated or corrupt"
    ):
        create("resnet18", pretrained=truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        create("resnet18", pretrained=garbage)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        create("resnet18", pretrained=path)


def test_pickle_that_needs_code(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"model": NotATensor()}, path)
    with pytest.raises(WeightsError, match="holds pickled code, not loaded: it names tests"):
        create("resnet18", pretrained=path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pth")
    with pytest.raises(WeightsError, match=r"not a state dict: weights are not tensors"):
        create("resnet18", pretrained=tmp_path / "list.pth")


def test_checkpoint_of_a_smaller_variant(tv_file: Path) -> None:
    with pytest.raises(
        WeightsError, match=r"do not fit resnet50: \d+ missing \(backbone\.stages\.0\.0\.conv3"
    ):
        create("resnet50", pretrained=tv_file)


def test_checkpoint_with_other_shapes(tmp_path: Path) -> None:
    with torch.device("meta"):
        shapes = torchvision.models.resnet50().state_dict()
    torch.save(
        {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, tmp_path / "r50.pth"
    )
    with pytest.raises(
        WeightsError,
        match=r"of the wrong shape \(checkpoint vs model: backbone\.stages\.0\.0\.conv1\.conv\.weight \(64, 64, 1, 1\) vs \(128, 64, 1, 1\)",
    ):
        create("wide_resnet50_2", pretrained=tmp_path / "r50.pth")


def test_checkpoint_of_another_family(tmp_path: Path) -> None:
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mnv2.pth")
    with pytest.raises(
        WeightsError,
        match=r"neither ours nor torchvision / timm's resnet18: \d+ of its \d+ keys are unknown, e\.g\. features\.0\.0\.weight",
    ):
        create("resnet18", pretrained=tmp_path / "mnv2.pth")


def test_offline_torchvision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(url: str, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached file to fall back on
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    url = torchvision.models.ResNet50_Weights.DEFAULT.url
    with pytest.raises(WeightsError) as error:
        create("resnet50", pretrained="torchvision")
    message = str(error.value)
    assert f"could not download torchvision's resnet50 weights from {url}" in message
    assert "python -m backbones fetch-weights resnet50 --source torchvision --out DIR" in message


def test_offline_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(
        WeightsError,
        match=r"could not download timm's resnet50 weights from https://huggingface.co/timm/resnet50\.a1_in1k .*fetch-weights resnet50 --source timm",
    ):
        create("resnet50", pretrained="timm")


def test_strict_false_loads_what_fits_and_reports_the_rest(
    tv_resnet18: nn.Module, tv_file: Path
) -> None:
    def group_norm(channels: int) -> nn.GroupNorm:
        return nn.GroupNorm(32, channels)

    with pytest.raises(
        WeightsError,
        match=r"unexpected \(stem\.norm\.running_mean.*Nothing was loaded; pass strict=False",
    ):
        create("resnet18", pretrained=tv_file, norm_layer=group_norm)
    with pytest.warns(
        UserWarning, match=r"skipped the rest: \d+ unexpected \(stem\.norm\.running_mean"
    ):
        model = create("resnet18", pretrained=tv_file, norm_layer=group_norm, strict=False)
    torch.testing.assert_close(model.stem.conv.weight, tv_resnet18.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.stem.norm.weight, tv_resnet18.bn1.weight, rtol=0, atol=0)


def test_failed_strict_load_changes_nothing(tv_backbone: dict[str, torch.Tensor]) -> None:
    model = create("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_dict = dict(tv_backbone)  # the fixture is shared: change a copy
    state_dict.pop("stages.3.1.conv2.norm.running_var")
    with pytest.raises(WeightsError, match=r"1 missing \(stages\.3\.1\.conv2\.norm\.running_var\)"):
        load_into(model, state_dict)
    assert_loaded(model, before)


@pytest.mark.parametrize("key", ["stages.3.1.conv2.conv.weight", "stem.norm.running_mean"])
def test_a_wrong_shape_in_our_layout_is_refused(
    key: str, tv_backbone: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Our own layout skips conversion, so `load_into` alone must see the wrong shape: nothing
    loads, the message names the tensor and both shapes."""
    state_dict = dict(tv_backbone)
    expected = tuple(state_dict[key].shape)
    state_dict[key] = torch.ones(expected[0] // 2, *expected[1:])
    wrong = rf"checkpoint vs model: {re.escape(key)} \({expected[0] // 2},.*\) vs \({expected[0]},"
    model = create("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=rf"1 of the wrong shape \({wrong}.*Nothing was loaded"):
        load_into(model, state_dict)
    assert_loaded(model, before)
    torch.save(state_dict, tmp_path / "ours.pth")
    with pytest.raises(WeightsError, match=wrong):
        create("resnet18", pretrained=tmp_path / "ours.pth")


def test_convert_rejects_unknown_keys(tv_resnet18: nn.Module) -> None:
    state_dict = dict(tv_resnet18.state_dict(), **{"layer9.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(
        WeightsError,
        match=r"1 keys of this checkpoint are not part of torchvision's resnet18: layer9\.0\.conv1\.weight",
    ):
        convert("resnet18", state_dict)


def test_convert_source_must_exist(tv_resnet18: nn.Module) -> None:
    with pytest.raises(
        ValueError, match=r"source must be one of \('torchvision', 'timm'\), got 'keras'"
    ):
        convert("resnet18", tv_resnet18.state_dict(), source="keras")


def test_read_state_dict_returns_tensors_only(tv_file: Path) -> None:
    state_dict = read_state_dict(tv_file)
    assert "conv1.weight" in state_dict and all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    )


def test_fetch_weights_cli(
    tv_resnet18: nn.Module, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from backbones.__main__ import main

    monkeypatch.setattr(
        torchvision.models._api,
        "load_state_dict_from_url",
        lambda *a, **k: tv_resnet18.state_dict(),
    )
    assert (
        main(["fetch-weights", "resnet18", "--source", "torchvision", "--out", str(tmp_path)]) == 0
    )
    path = tmp_path / "resnet18-torchvision.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind
    # The file is in our key space and is what an air-gapped node loads.
    assert read_state_dict(path).keys() == build_classifier("resnet18").state_dict().keys()
    model = build_classifier("resnet18", pretrained=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_error(model(x), tv_resnet18(x)) <= 1e-5
    with pytest.raises(WeightsError, match=r"holds weights for 'resnet18', not 'resnet34'"):
        create("resnet34", pretrained=path)


def test_backbone_only_checkpoint_into_a_classifier(tmp_path: Path) -> None:
    source = randomize_norms(create("resnet18", out_features=("C5",)))
    torch.save(source.state_dict(), tmp_path / "backbone.pt")
    with pytest.warns(UserWarning, match="have no classifier; the head starts from random weights"):
        model = build_classifier("resnet18", num_classes=5, pretrained=tmp_path / "backbone.pt")
    assert_loaded(model.backbone, source.state_dict())
