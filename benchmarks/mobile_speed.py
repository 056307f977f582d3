"""CPU inference speed of our MobileNet/EfficientNet backbones against torchvision's `features`.

Both run the same weights (torchvision's random init, converted) under `torch.inference_mode()`,
in contiguous (NCHW) and channels_last (NHWC) memory formats. After a warm-up the two models are
timed in alternation, so load from other processes hits both alike; the table gives the median
time per batch with its interquartile range, and the same for the ratio ours / torchvision of
each pair of back-to-back runs.

    python benchmarks/mobile_speed.py                       # batch 8 at 224x224
    python benchmarks/mobile_speed.py --threads 1 --repeats 50 mobilenet_v3_large
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

from backbones import convert, create

NAMES = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def build_pair(name: str) -> tuple[nn.Module, nn.Module]:
    """(ours, torchvision's `features`), both returning the C5 map, with the same weights."""
    reference = torchvision.models.get_model(name).eval()
    ours = create(name, out_features=("C5",)).eval()
    weights = convert(name, reference.state_dict())
    ours.load_state_dict(
        {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    )
    return ours, reference.features


def timed(model: nn.Module, x: torch.Tensor, clock: Callable[[], float]) -> float:
    """Milliseconds of one forward pass."""
    start = clock()
    model(x)
    return (clock() - start) * 1e3


def op_counts(model: nn.Module, x: torch.Tensor) -> Counter[str]:
    """How often each ATen operator runs in one forward pass."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    return Counter({event.key: event.count for event in prof.key_averages()})


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return q1, median, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=NAMES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall: elapsed time; cpu: CPU time of this process, which on a machine shared "
        "with other jobs leaves out the time they take the cores (use with --threads 1)",
    )
    parser.add_argument(
        "--ops",
        action="store_true",
        help="also list the ATen operators whose call counts differ between the two models",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = CLOCKS[args.clock]

    print(
        f"batch {args.batch} x 3 x {args.size} x {args.size}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{args.repeats} alternating runs after {args.warmup} warm-up runs; {args.clock} ms per "
        "batch, median [interquartile range]\n"
    )
    print("| model | memory format | torchvision | ours | ours / torchvision |")
    print("|---|---|---:|---:|---:|")
    op_differences = []
    for name in args.names:
        ours, reference = build_pair(name)
        for format_name, memory_format in FORMATS.items():
            x = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=memory_format)
            ours, reference = (
                ours.to(memory_format=memory_format),
                reference.to(memory_format=memory_format),
            )
            with torch.inference_mode():
                torch.testing.assert_close(ours(x)["C5"], reference(x))  # same network
                for _ in range(args.warmup):
                    ours(x), reference(x)
                if args.ops:
                    ours_ops, reference_ops = op_counts(ours, x), op_counts(reference, x)
                    differing = sorted(
                        op for op in ours_ops | reference_ops if ours_ops[op] != reference_ops[op]
                    )
                    summary = ", ".join(
                        f"{op} {ours_ops[op]} / {reference_ops[op]}" for op in differing
                    )
                    op_differences.append(f"| {name} | {format_name} | {summary or 'none'} |")
                times: dict[nn.Module, list[float]] = {ours: [], reference: []}
                for i in range(args.repeats):
                    # alternate which model runs first, so neither always follows the other
                    for model in (ours, reference) if i % 2 == 0 else (reference, ours):
                        times[model].append(timed(model, x, clock))
            # each round's ratio compares two runs made back to back, under the same load
            ratios = [a / b for a, b in zip(times[ours], times[reference], strict=True)]
            cells = [quartiles(times[reference]), quartiles(times[ours]), quartiles(ratios)]
            print(
                f"| {name} | {format_name} | "
                + " | ".join(
                    f"{q[1]:.{d}f} [{q[0]:.{d}f}-{q[2]:.{d}f}]"
                    for q, d in zip(cells, (1, 1, 2), strict=True)
                )
                + " |",
                flush=True,
            )
    if op_differences:
        print("\n| model | memory format | ATen calls that differ (ours / torchvision) |")
        print("|---|---|---|")
        print("\n".join(op_differences))


if __name__ == "__main__":
    main()
