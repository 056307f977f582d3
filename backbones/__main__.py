"""Command line: `python -m backbones {list,demo,fetch-weights} ...`."""

from __future__ import annotations

import argparse
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from . import create, list_backbones
from ._base import get_entry
from .weights import SOURCES, WeightsError, fetch_weights

console = Console()


def cmd_list(args: argparse.Namespace) -> None:
    table = Table(title="Registered backbones")
    for column in ("name", "C3", "C4", "C5", "levels", "weights from"):
        table.add_column(
            column, justify="left" if column in ("name", "levels", "weights from") else "right"
        )
    for name in list_backbones(args.pattern):
        with torch.device("meta"):  # shapes only, no memory
            model = create(name, out_features=("C5",))
        channels = {f.name: f.channels for f in model.feature_info}
        table.add_row(
            name,
            *(str(channels.get(level, "-")) for level in ("C3", "C4", "C5")),
            " ".join(f.name for f in model.feature_info),
            ", ".join(get_entry(name).sources),
        )
    console.print(table)


def cmd_demo(args: argparse.Namespace) -> None:
    model = create(args.name, out_features=tuple(args.levels.split(","))).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    start = time.perf_counter()
    with torch.inference_mode():
        features = model(x)
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    table = Table(title=f"{args.name}, input {tuple(x.shape)}")
    for column in ("level", "shape", "channels", "stride"):
        table.add_column(column, justify="right")
    for level, feature in features.items():
        table.add_row(
            level, str(tuple(feature.shape)), str(model.channels[level]), str(model.strides[level])
        )
    console.print(table)
    console.print(f"{params / 1e6:.2f}M parameters; forward pass {elapsed * 1e3:.0f} ms on CPU")


def cmd_fetch(args: argparse.Namespace) -> None:
    for name in args.names:
        path = fetch_weights(name, args.source, args.out)
        console.print(f"[green]wrote[/] {path}  ->  create({name!r}, pretrained={str(path)!r})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backbones", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("list", help="registered backbones with their C3/C4/C5 channels")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'resne*'")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("demo", help="build a backbone and print its feature shapes")
    p.add_argument("name", nargs="?", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--levels", default="C3,C4,C5", help="comma-separated levels")
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser(
        "fetch-weights", help="download weights and save them as .safetensors in our key space"
    )
    p.add_argument("names", nargs="+", help="backbone names")
    p.add_argument("--source", choices=SOURCES, default="torchvision")
    p.add_argument("--out", required=True, help="directory to write <name>-<source>.safetensors to")
    p.set_defaults(func=cmd_fetch)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, WeightsError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
