"""backbones.timm_models: every backbone in timm's registry as `zoo_<name>`, built the timm way."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import backbones.timm_models  # noqa: F401  (registers zoo_<name>)
from backbones import get_entry, list_backbones
from backbones.timm_models import level_names
from heads import Classifier, FeatureList

SIZE = (65, 97)  # odd: the maps are ceil(size / stride)


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_is_a_timm_feature_extractor(name: str) -> None:
    """Wiring only, built on the meta device: timm's feature-extractor interface, every name."""
    with torch.device("meta"):
        model = timm.create_model(f"zoo_{name}", features_only=True, out_indices=(-3, -2, -1))
    info = model.feature_info
    assert isinstance(model, FeatureList)
    # C3, C4, C5: the three coarsest levels of every family
    assert model.backbone.out_features == ("C3", "C4", "C5")
    assert info.channels() == [level.channels for level in info][-3:]
    assert info.reduction() == [8, 16, 32]
    # every level, indexed as timm indexes them; items answer timm's dict keys
    assert [level.name for level in info] == list(level_names(name))
    assert info.out_indices == tuple(range(len(info)))[-3:]
    for index, level in enumerate(info):
        assert info[index]["num_chs"] == level.channels and info[index]["reduction"] == level.stride
        assert info.module_name(index) == info[index]["module"]
    # module names resolve in the model: the last stage kept outputs C5
    assert model.get_submodule(info.module_name()[-1]) is model.backbone.stages[-1]
    assert info.get_dicts(keys=["num_chs", "reduction"]) == [
        {"num_chs": c, "reduction": r}
        for c, r in zip(info.channels(), info.reduction(), strict=True)
    ]


def test_a_feature_extractor_returns_the_maps_feature_info_describes() -> None:
    model = timm.create_model("zoo_mobilenet_v3_small", features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(2, 3, *SIZE))
    assert [m.shape[1] for m in maps] == model.feature_info.channels() == [16, 16, 24, 48, 576]
    assert [m.shape[-2:] for m in maps] == [
        tuple(math.ceil(s / stride) for s in SIZE) for stride in model.feature_info.reduction()
    ]


@pytest.mark.parametrize(
    ("name", "timm_name", "offset"),
    [
        ("resnet50", "resnet50", 0),
        ("convnext_tiny", "convnext_tiny", 0),
        ("mobilenet_v3_large", "mobilenetv3_large_100", 0),
        ("vgg16", "vgg16", 1),  # timm's VGG has a stride-1 map at index 0, which is no level here
    ],
)
def test_out_indices_count_levels_as_timm_does(name: str, timm_name: str, offset: int) -> None:
    with torch.device("meta"):
        theirs = timm.create_model(timm_name, features_only=True).feature_info  # every level
        ours = timm.create_model(f"zoo_{name}", features_only=True).feature_info
    assert ours.reduction() == theirs.reduction()[offset:]
    for indices in ((1, 2, 3), (-2, -1), (0,)):
        expected = [theirs.reduction(i + offset if i >= 0 else i) for i in indices]
        with torch.device("meta"):
            model = timm.create_model(f"zoo_{name}", features_only=True, out_indices=indices)
        assert model.feature_info.reduction() == expected, indices


def test_output_stride_in_channels_and_drop_path_rate_reach_the_backbone() -> None:
    with torch.device("meta"):
        model = timm.create_model(
            "zoo_mobilenet_v3_large",
            features_only=True,
            out_indices=(2, 3, 4),
            output_stride=16,
            in_chans=1,
            drop_path_rate=0.2,  # what effdet passes
            num_classes=5,  # a head option: a feature extractor has no head, as timm's
        )
    assert model.feature_info.reduction() == [8, 16, 16]
    assert model.backbone.in_chans == 1 and model.backbone.drop_path_rate == 0.2
    with torch.device("meta"):
        mine = timm.create_model("zoo_resnet18", features_only=True, out_features=("C2", "C5"))
    assert mine.feature_info.reduction() == [4, 32]


def test_without_features_only_it_is_the_classifier() -> None:
    model = timm.create_model("zoo_resnet18", num_classes=10, output_stride=16).eval()
    assert isinstance(model, Classifier) and model.head.fc.out_features == 10
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    config = timm.data.resolve_model_data_config(model)  # the statistics its weights expect
    assert (config["mean"], config["std"]) == (
        get_entry("resnet18").mean,
        get_entry("resnet18").std,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (  # an option the family lacks is refused when it asks for something ...
            {"drop_path_rate": 0.1},
            TypeError,
            r"vgg16 got an unexpected keyword argument 'drop_path_rate'\. 'drop_path_rate' is an "
            r"argument of ConvNeXt, EfficientNet, MobileNetV2, MobileNetV3, ResNet, not of VGG\. "
            r"VGG takes: out_features, in_chans, frozen_stages, norm_eval, norm_layer\.",
        ),
        (
            {"output_stride": 16},
            TypeError,
            r"vgg16 got an unexpected keyword argument 'output_stride'\..* VGG takes: ",
        ),
        ({"drop_block_rate": 0.1}, TypeError, r"unexpected keyword argument 'drop_block_rate'"),
        (
            {"out_indices": (5,)},
            ValueError,
            r"zoo_vgg16 has 5 levels, 0: C1, 1: C2, 2: C3, 3: C4, 4: C5; out_indices=\(5,\) asks "
            r"for \[5\]\. Use indices in -5\.\.4",
        ),
        ({"out_indices": (1,), "out_features": ("C2",)}, TypeError, r"not both"),
        ({"cache_dir": "/tmp"}, TypeError, r"zoo_vgg16 takes no cache_dir"),
    ],
)
def test_options_the_family_lacks(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message), torch.device("meta"):
        timm.create_model("zoo_vgg16", features_only=True, **kwargs)


def test_options_that_ask_for_nothing_pass() -> None:
    # ... and accepted when it asks for nothing, as timm's callers spell it
    with torch.device("meta"):
        model = timm.create_model(
            "zoo_vgg16",
            features_only=True,
            drop_path_rate=0.0,
            output_stride=32,
            drop_block_rate=None,
            drop_rate=0.0,
        )
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    with pytest.raises(TypeError, match=r"zoo_resnet18: out_indices choose the maps of a feature"):
        timm.create_model("zoo_resnet18", out_indices=(1, 2))


def test_pretrained_uses_our_weight_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    asked = []

    def download(name: str, source: str) -> dict[str, torch.Tensor]:  # stands in for the network
        asked.append((name, source))
        return reference.state_dict()  # torchvision's and timm's resnet18 keys are the same

    monkeypatch.setattr("backbones.weights.download", download)
    model = timm.create_model("zoo_resnet18", pretrained=True, features_only=True)
    assert torch.equal(model.backbone.stem.conv.weight, reference.conv1.weight)
    timm.create_model("zoo_resnet18.timm", pretrained=True, features_only=True)  # the tag chooses
    assert asked == [("resnet18", "torchvision"), ("resnet18", "timm")]
    # a weights file, as timm's own models take one
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = timm.create_model(
        "zoo_resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=3
    )
    assert torch.equal(model.backbone.stem.conv.weight, reference.conv1.weight)
    assert model.head.fc.out_features == 3 and len(asked) == 2
    with pytest.raises(
        ValueError, match=r"zoo_vgg16 has no 'timm' weights; its tags choose where "
    ):
        timm.create_model("zoo_vgg16.timm", pretrained=True)


def test_backbones_does_not_import_timm_and_the_bridge_names_the_extra() -> None:
    """timm is an optional extra: the core imports without it; the bridge says how to get it."""
    script = (
        "import sys\n"
        "import backbones, heads\n"
        "assert 'timm' not in sys.modules, 'backbones imported timm'\n"
        "sys.modules['timm'] = None  # as if it were not installed\n"
        "import backbones.timm_models\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: backbones.timm_models registers our backbones with timm, which is not "
        "installed: pip install 'backbone-zoo[timm]'"
    )
