"""Command line: `python -m backbones {list,demo,fetch-weights,summary,bench,export} ...`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

try:
    from rich.console import Console
    from rich.table import Table
except ImportError:  # the core install: the command's tables need rich
    sys.exit("error: the backbones command needs rich: pip install 'backbone-zoo[cli]'")

from . import create, list_backbones
from .registry import get_entry
from .tools.bench import BenchError
from .tools.export import FORMATS, ExportError
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


def cmd_summary(args: argparse.Namespace) -> None:
    from .tools.summary import summarize

    height, width = args.size
    levels = summarize(args.name, height, width)
    table = Table(title=f"{args.name}, input 1x3x{height}x{width}")
    for column in ("level", "shape", "stride", "receptive field", "params", "GFLOPs"):
        table.add_column(column, justify="left" if column == "level" else "right")
    for level in levels:
        rows, cols = level.receptive_field
        field = str(rows) if rows == cols else f"{rows}x{cols}"
        table.add_row(
            level.name,
            "x".join(map(str, level.shape[1:])),
            str(level.stride),
            field + (" + global" if level.global_context else ""),
            f"{level.params / 1e6:.2f}M",
            f"{level.flops / 1e9:.3f}",
        )
    params, flops = sum(lv.params for lv in levels), sum(lv.flops for lv in levels)
    table.add_row("total", "", "", "", f"{params / 1e6:.2f}M", f"{flops / 1e9:.3f}", style="bold")
    console.print(table)
    console.print(
        "params and GFLOPs (torch.utils.flop_counter, 2 per multiply-add, batch 1) are those "
        "of the layers since the previous level; the receptive field is the theoretical one, "
        "in input pixels, and its effective stride equals the level's stride."
    )
    if any(level.global_context for level in levels):
        console.print(
            "+ global: a squeeze-excite (or other global pooling) before this level lets every "
            "output pixel see the whole image."
        )


def cmd_export(args: argparse.Namespace) -> None:
    from .tools.export import export, require_onnx
    from .tools.summary import check_size, meta_backbone

    if args.format == "onnx":
        require_onnx()  # before building anything
    height, width = args.size
    check_size(args.name, meta_backbone(args.name), height, width)
    model = create(args.name, pretrained=args.pretrained, out_features=args.levels.split(","))
    model.eval()
    if args.fuse:  # back to contiguous weights: the exported graph fixes no memory format
        model.fuse().to(memory_format=torch.contiguous_format)
    example = torch.randn(args.batch, model.in_chans, height, width)
    checks = export(model, args.out, example, format=args.format)
    console.print(f"[green]wrote[/] {args.out} ({args.format}; dynamic batch, height and width)")
    for check in checks:
        console.print(
            f"  input {tuple(check.shape)}: max abs diff {check.max_abs_diff:.2e} against eager "
            f"(relative {check.max_rel_diff:.2e})"
        )


def cmd_bench(args: argparse.Namespace) -> None:
    import platform
    import shlex

    import torchvision

    from .tools import bench
    from .tools.export import require_onnx
    from .tools.summary import check_size, meta_backbone

    allocator = bench.set_up_allocator()  # before the large allocations
    names = args.models.split(",")
    for name in names:
        check_size(name, meta_backbone(name), args.size, args.size)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    device = torch.device(args.device)
    allowed = bench.CUDA_VARIANTS if device.type == "cuda" else tuple(bench.VARIANTS)
    keys = args.variants.split(",") if args.variants else list(allowed)
    unknown = [key for key in keys if key not in allowed]
    if unknown:
        raise ValueError(
            f"--variants: {', '.join(unknown)} not available on {device.type}; choose from "
            f"{','.join(allowed)}"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    processor = platform.processor() or platform.machine()
    if device.type == "cuda":
        processor = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    if "onnxruntime" in keys:
        require_onnx()  # one clear error before anything is built
        import onnxruntime

        versions += f", onnxruntime {onnxruntime.__version__}"
    header = [
        f"`{' '.join(['python -m backbones bench', *map(shlex.quote, sys.argv[2:])])}`",
        "",
        f"- {processor}, {torch.get_num_threads()} threads; {versions}",
        f"- batch {args.batch} x 3 x {args.size} x {args.size}, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, inference mode; "
        f"{args.repeats} alternating rounds after {args.warmup} warm-up rounds; "
        f"{'CUDA events' if device.type == 'cuda' else args.clock + ' clock'}",
        f"- torch.compile options {bench.COMPILE_OPTIONS}; ONNX Runtime: all graph "
        "optimisations, intra-op threads = torch's, no spinning",
        f"- {allocator}",
    ]
    for line in header[2:]:
        console.print(line, highlight=False)
    out = Path(args.out_dir)
    markdown, plot = out / "RESULTS.md", out / f"throughput_{device.type}.png"
    rows = bench.measure(
        names,
        args.batch,
        args.size,
        device,
        keys,
        warmup=args.warmup,
        repeats=args.repeats,
        clock=args.clock,
        log=lambda line: console.print(line, highlight=False, soft_wrap=True),
        # rewritten after every model, so an interrupted run keeps what it measured
        after_model=lambda rows: bench.write_results(rows, header, markdown, plot, device.type),
    )
    console.print("\n".join(bench.table(rows)), highlight=False, soft_wrap=True)
    console.print(f"[green]wrote[/] {markdown} and {plot}")


def _size(text: str) -> tuple[int, int]:
    """`224` or `224x320` (height x width)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):  # also "abc", "1x2x3"
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, e.g. 224 or 224x320; got {text!r}")
    return (sizes[0], sizes[-1])


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

    p = commands.add_parser(
        "summary", help="per level: shape, stride, receptive field, params, GFLOPs"
    )
    p.add_argument("name")
    p.add_argument("--size", type=_size, default=(224, 224), help="SIZE or HxW (default 224)")
    p.set_defaults(func=cmd_summary)

    p = commands.add_parser(
        "export", help="ONNX or torch.export .pt2 with dynamic batch/size, checked against eager"
    )
    p.add_argument("name")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--out", required=True, help="file to write, e.g. model.onnx or model.pt2")
    p.add_argument("--size", type=_size, default=(224, 224), help="example SIZE or HxW")
    p.add_argument("--batch", type=int, default=1, help="example batch size")
    p.add_argument("--levels", default="C3,C4,C5", help="comma-separated levels to output")
    p.add_argument("--pretrained", default=None, help="'torchvision', 'timm' or a weights file")
    p.add_argument("--fuse", action="store_true", help="fold BatchNorms into convs first")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser(
        "bench",
        help="img/s of torchvision eager vs ours eager/fused/compiled/ONNX Runtime; writes "
        "RESULTS.md and a plot",
    )
    p.add_argument(
        "--models",
        default="resnet50,mobilenet_v3_large,efficientnet_b0,densenet121",
        help="comma-separated",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (median, quartiles)")
    p.add_argument("--threads", type=int, default=None, help="default: torch's")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of torchvision,eager,fused,compile,onnxruntime (default: "
        "all; on cuda all but onnxruntime)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="CPU timing: wall clock, or this process's CPU time (not inflated by other "
        "processes' load; use with --threads 1)",
    )
    p.add_argument("--out-dir", default="benchmarks", help="where RESULTS.md and the PNG go")
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, WeightsError, FileNotFoundError, ExportError, BenchError) as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
