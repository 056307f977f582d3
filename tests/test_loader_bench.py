"""benchmarks/loader.py end to end at toy sizes: it generates its JPEG folder and tree, times
both loaders, and reports every table with the ratios the issue's targets name. (Timings are
never asserted; a merge once left the module importing a name that had moved, unseen.)"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks import loader


def test_the_loader_benchmark_reports_every_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    section = loader.main(
        [
            "--root", str(tmp_path / "data"), "--rounds", "1", "--images", "8",
            "--photos", "16", "--files", "1000", "--batch-size", "4", "--image-size", "32",
            "--workers", "1", "--out", str(out),
        ]
    )  # fmt: skip
    text = "\n".join(section)
    for row in (
        f"| {loader.REFERENCE} |",
        f"| {loader.OLD} |",
        f"| {loader.NEW} |",
        "| read: decode_jpeg (new) |",
        "| RandomResizedCrop + flip on PIL images (reference) |",
        "| reference img/s (best round) |",
        "| old img/s (best round) |",
        "| new (uint8) |",
        "| ImageFolderDataModule.setup (a directory walk) |",
    ):
        assert row in text, text
    assert re.search(
        r"new per core \(target >= 1.8x\): [\d.]+x the reference pipeline, [\d.]+x the old one; "
        r"set-up / torchvision's: [\d.]+x",
        text,
    )
    # the set-up tree: 1,000 hard links to the generated photographs
    assert len(list((tmp_path / "data" / "tree").rglob("*.JPEG"))) == 1000
    assert not list(out.iterdir())  # RESULTS.md is only rewritten under benchmarks/
