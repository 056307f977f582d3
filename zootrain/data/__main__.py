"""Check a dataset folder outside a run: `python -m zootrain.data verify ROOT`.

verify decodes every image file under ROOT, as ImageFolder lists them (by suffix, hidden files
and folders skipped, links followed, no folder twice), on every core, with a progress bar;
it names each file that does not decode and exits with status 1 if there is one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .imagefolder import IMAGE_EXTENSIONS, _identity, verify_images, walk


def image_files(root: Path) -> list[str]:
    """Every image file under `root`, by suffix, as ImageFolder's listing finds them."""
    top = os.fsencode(root)
    return [
        os.fsdecode(os.path.join(directory, name))
        for directory, names in walk(top, {_identity(top)}, [])
        for name in names
        if os.path.splitext(os.fsdecode(name))[1].lower() in IMAGE_EXTENSIONS
    ]


def verify(root: Path, workers: int | None) -> int:
    """Decode every image under `root`; print the bad ones; 1 if there are any, else 0."""
    paths = image_files(root)
    columns = (TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:  # stdout: results
        task = bar.add_task("verify", total=len(paths))
        bad = verify_images(paths, workers, progress=lambda n: bar.advance(task, n))
    for _, why in bad:
        print(why)
    if bad:
        print(f"{len(bad)} of {len(paths)} image files under {root} do not decode", file=sys.stderr)
        return 1
    print(f"all {len(paths)} image files under {root} decode")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zootrain.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    checker = commands.add_parser("verify", help="decode every image file under ROOT")
    checker.add_argument("root", type=Path, help="a dataset folder (e.g. ImageFolder's root)")
    checker.add_argument(
        "--workers", type=int, default=None, help="decoding threads (default: every core)"
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a directory")
    return verify(args.root, args.workers)


if __name__ == "__main__":
    sys.exit(main())
