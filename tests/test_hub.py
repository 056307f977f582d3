"""hubconf.py: torch.hub entry points for every backbone and build_classifier (no network)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

import backbones
from backbones import create, list_backbones

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def hub_cache(tmp_path: Path) -> Iterator[str]:
    """torch.hub.list and help read GitHub repositories only: this checkout in a hub cache, as a
    download of `zoo/backbone-zoo` leaves it, stands in for one (nothing is fetched)."""
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    (tmp_path / "zoo_backbone-zoo_main").symlink_to(ROOT, target_is_directory=True)
    yield "zoo/backbone-zoo:main"
    torch.hub.set_dir(before)


def test_load_builds_what_create_builds(tmp_path: Path) -> None:
    weights = tmp_path / "tv_resnet18.pth"  # stands in for a download
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    options = {"pretrained": str(weights), "out_features": ("C4", "C5")}
    hub = torch.hub.load(str(ROOT), "resnet18", source="local", **options).eval()
    ours = create("resnet18", **options).eval()
    assert hub.channels == {"C4": 256, "C5": 512}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for level, feature in hub(x).items():
            torch.testing.assert_close(feature, ours(x)[level], rtol=0, atol=0)
    classifier = torch.hub.load(
        str(ROOT), "build_classifier", source="local", backbone="resnet18", num_classes=10
    )
    assert classifier.eval()(x).shape == (1, 10)


def test_pretrained_true_takes_the_first_library_that_has_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hubconf

    asked = []
    monkeypatch.setattr(backbones, "create", lambda name, **kw: asked.append((name, kw)))
    hubconf.convnext_tiny(pretrained=True, in_chans=1)
    hubconf.resnet50(pretrained=False)
    assert asked == [
        ("convnext_tiny", {"pretrained": "torchvision", "in_chans": 1}),
        ("resnet50", {"pretrained": None}),
    ]


def test_list_and_help_show_every_backbone(hub_cache: str) -> None:
    names = torch.hub.list(hub_cache, trust_repo=True, verbose=False)
    assert sorted(names) == sorted([*list_backbones(), "build_classifier"])
    text = torch.hub.help(hub_cache, "efficientnet_b0", trust_repo=True)
    assert "backbones.create('efficientnet_b0', pretrained=..., **kwargs)" in text
    assert "True (torchvision's weights)" in text


def test_hubconf_needs_neither_lightning_nor_hydra() -> None:
    """The core install only: with Lightning, Hydra and OmegaConf unimportable, a model loads."""
    code = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf'):\n"
        "    sys.modules[name] = None\n"
        "import torch\n"
        f"model = torch.hub.load({str(ROOT)!r}, 'mobilenet_v3_small', source='local')\n"
        "print(sorted(model.channels))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['C3', 'C4', 'C5']"
