"""Inference speed of a backbone run the ways a user would deploy it, side by side in one process.

The variants of one model, all computing our C5 from the same weights (torchvision's random
init, converted into ours):
- torchvision eager: torchvision's `features` (plus the ReLU DenseNet applies in `forward`),
- ours eager, ours fused (`fuse()`: BatchNorm folded into the convs),
- ours compiled: `torch.compile` with inductor's freezing (weights become constants, so the
  compiler folds and prepacks them; the mode meant for inference),
- ONNX Runtime (CPU): ours exported by `tools.export` (dynamo exporter), run by a session
  with every graph optimisation, torch's intra-op thread count, and no spinning idle threads.
PyTorch variants take channels_last inputs and weights (what one picks for CNN inference on
CPU, and with bf16 on GPU); ONNX Runtime takes NCHW, the only layout an ONNX graph has, and
picks its own blocked layout inside. Before anything is timed, each variant's output on the
timed input is compared with ours eager (and the ONNX file at two shapes by the export);
a variant that disagrees stops the benchmark. After warm-up the variants run in alternation,
the order reversed every round, so load from other processes hits them alike; tables give
the median with the interquartile range.

CPU timings are set up against allocator noise: glibc's malloc returns large blocks to the
system and maps them afresh (page faults on every large activation), which swings a model by
20-60% between repeats. `set_up_allocator` keeps freed memory in the heap instead (mallopt).
On a machine shared with other work, `clock="cpu"` with one thread times each variant's own
compute. On GPU: CUDA events, bf16 autocast, no ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..contract import Backbone
from ..factory import create
from ..files import atomic_path
from ..registry import get_entry
from ..weights import backbone_part, convert
from .export import export

# The heading of `python -m benchmarks.training`'s section of RESULTS.md, which follows this tool's
# sections in the same file: both writers keep the other's part by it.
TRAINING_SECTION = "# Training benchmark"

# variant key -> label in the tables
VARIANTS = {
    "torchvision": "torchvision eager",
    "eager": "ours eager",
    "fused": "ours fused",
    "compile": "ours torch.compile",
    "onnxruntime": "ours ONNX Runtime",
}
CUDA_VARIANTS = ("torchvision", "eager", "fused", "compile")
COMPILE_OPTIONS = {"freezing": True}  # inductor: parameters become constants (inference only)
# max |variant - ours eager| / max |ours eager| on the timed input
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


class BenchError(RuntimeError):
    """A variant does not compute what ours eager computes; the message says by how much."""


def set_up_allocator() -> str:
    """Keep freed memory in glibc's heap, so repeats do not page-fault; says what it did."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "allocator: system default (not glibc; no mallopt tuning)"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    ok = all(
        libc.mallopt(param, value)
        for param, value in (
            (_M_MMAP_MAX, 0),  # never mmap: large blocks come from the heap and stay mapped
            (_M_TRIM_THRESHOLD, 2**31 - 1),  # never give the heap's top back to the system
            (_M_ARENA_MAX, 1),  # one heap, reused by every thread
        )
    )
    if not ok:
        return "allocator: glibc, mallopt refused (timings may swing with page faults)"
    return (
        "allocator: glibc with mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1, M_ARENA_MAX=1): "
        "freed activations stay mapped, so repeats do not page-fault"
    )


@dataclass
class Variant:
    """One way of running one model: a callable on a prepared input."""

    key: str  # a key of VARIANTS
    layout: str  # the input the callable takes
    run: Callable[[], torch.Tensor]  # -> C5
    times_ms: list[float]
    max_rel_diff: float = 0.0  # against ours eager, on the timed input


@dataclass(frozen=True)
class Row:
    model: str
    variant: str  # a label of VARIANTS
    layout: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    images_per_s: float
    speedup: float | None  # img/s over torchvision eager's, when that was timed
    max_rel_diff: float


def build_implementations(name: str) -> dict[str, nn.Module]:
    """{"eager": ours, "torchvision": its features}, in eval mode with the same weights."""
    torch.manual_seed(0)
    ours = create(name, out_features=("C5",)).eval()
    built: dict[str, nn.Module] = {"eager": ours}
    if "torchvision" in get_entry(name).sources:
        import torchvision

        reference = torchvision.models.get_model(name).eval()
        weights = convert(name, reference.state_dict())
        ours.load_state_dict(backbone_part(weights))
        built["torchvision"] = like_ours(_features_of(reference), ours, name)
    return built


def _features_of(reference: nn.Module) -> nn.Module:
    if hasattr(reference, "features"):
        return reference.features
    return nn.Sequential(*list(reference.children())[:-2])


def like_ours(features: nn.Module, ours: nn.Module, name: str) -> nn.Module:
    """torchvision's features, extended where needed to compute exactly what our C5 is.

    Our C5 is what the classifier pools, so it ends with the final norm's activation; where
    torchvision applies that activation in `forward` rather than in `features` (DenseNet's
    ReLU after norm5), timing `features` alone would leave it out. Instead of a per-family
    list, the outputs decide on a small input (same weights): `features` as is, or followed by
    a ReLU; anything else means the two are not the same computation and cannot be compared.
    """
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, theirs = ours(x)["C5"], features(x)
    for candidate, extended in ((theirs, features), (theirs.relu(), WithReLU(features))):
        if candidate.shape == expected.shape and torch.allclose(
            candidate, expected, rtol=1e-4, atol=1e-5
        ):
            return extended
    raise RuntimeError(
        f"torchvision's {name} features do not compute our C5 (with or without a final ReLU): "
        "the benchmark would compare different work"
    )


class WithReLU(nn.Module):
    """torchvision features followed by the ReLU its `forward` applies (DenseNet)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.features(x))


def compile_model(model: nn.Module) -> nn.Module:
    """`torch.compile` as a user deploying for inference would call it."""
    return torch.compile(model, options=COMPILE_OPTIONS)


def onnxruntime_session(model: Backbone, example: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Export `model` with `tools.export` (checked against eager at two shapes), load it into a
    tuned ONNX Runtime session, and return a callable that computes C5 of `example` with it."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        for check in export(model, path, example, format="onnx"):
            if check.max_rel_diff > TOLERANCE[torch.float32]:
                raise BenchError(
                    f"the ONNX export of {type(model).__name__} differs from eager at input "
                    f"{check.shape}: max relative difference {check.max_rel_diff:.2e}"
                )
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # idle workers sleep instead of spinning, so they take no cores from the variant timed
        # next (torch's OpenMP threads spin only briefly)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    inputs = {"image": example.contiguous().numpy()}
    return lambda: torch.from_numpy(session.run(["C5"], inputs)[0])


def variants(
    name: str, batch: int, size: int, device: torch.device, keys: list[str]
) -> list[Variant]:
    """The variants `keys` of model `name`, each checked against ours eager on the timed input."""
    implementations = build_implementations(name)
    ours = implementations["eager"]
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    layout = "bf16 channels_last" if cuda else "fp32 channels_last"
    cl = torch.channels_last
    found: list[Variant] = []
    if "onnxruntime" in keys:  # exported from the contiguous model, before anything changes it
        found.append(Variant("onnxruntime", "fp32 NCHW", onnxruntime_session(ours, x), []))
    x = x.to(device, memory_format=cl)
    ours.to(device, memory_format=cl)

    def eager(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            autocast = torch.autocast("cuda", dtype) if cuda else contextlib.nullcontext()
            with torch.inference_mode(), autocast:
                output = model(x)
            return output["C5"] if isinstance(output, dict) else output

        return run

    for key in keys:
        if key == "eager":
            found.append(Variant(key, layout, eager(ours), []))
        elif key == "torchvision" and "torchvision" in implementations:
            theirs = implementations["torchvision"].to(device, memory_format=cl)
            found.append(Variant(key, layout, eager(theirs), []))
        elif key == "fused":
            found.append(Variant(key, layout, eager(copy.deepcopy(ours).fuse()), []))
        elif key == "compile":
            found.append(Variant(key, layout, eager(compile_model(ours)), []))
    found.sort(key=lambda v: list(VARIANTS).index(v.key))
    reference = eager(ours)().float()
    scale = reference.abs().max().item()
    for variant in found:
        output = variant.run()  # also compiles, for the compiled variant
        variant.max_rel_diff = (output.float() - reference).abs().max().item() / scale
        if variant.max_rel_diff > TOLERANCE[dtype]:
            raise BenchError(
                f"{name}: {VARIANTS[variant.key]} differs from ours eager by "
                f"{variant.max_rel_diff:.2e} (max relative difference; tolerance "
                f"{TOLERANCE[dtype]:.0e}): it would time a different computation"
            )
    return found


def _wall_timer(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def _cpu_timer(run: Callable[[], object]) -> float:
    start = time.process_time()
    run()
    return (time.process_time() - start) * 1e3


def _cuda_timer(run: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def measure(
    names: list[str],
    batch: int,
    size: int,
    device: torch.device,
    keys: list[str],
    warmup: int = 3,
    repeats: int = 10,
    clock: str = "wall",
    log: Callable[[str], None] = print,
    after_model: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Time the variants `keys` of every model: one `Row` each.

    On CPU, `clock="cpu"` times with the process's CPU time instead of the wall clock: other
    processes' load does not inflate it, and with one thread it is the compute time (with more,
    it also counts the threads' waits). `after_model(rows so far)` runs after each model, e.g.
    to save partial results.
    """
    timers = {"cuda": _cuda_timer, "wall": _wall_timer, "cpu": _cpu_timer}
    timer = timers["cuda" if device.type == "cuda" else clock]
    rows: list[Row] = []
    for name in names:
        runs = variants(name, batch, size, device, keys)
        for _ in range(warmup):
            for variant in runs:
                variant.run()
        for round_ in range(repeats):
            for variant in runs if round_ % 2 == 0 else reversed(runs):
                variant.times_ms.append(timer(variant.run))
        baseline = next((v for v in runs if v.key == "torchvision"), None)
        for variant in runs:
            q1, median, q3 = _quartiles(variant.times_ms)
            row = Row(
                model=name,
                variant=VARIANTS[variant.key],
                layout=variant.layout,
                median_ms=median,
                q1_ms=q1,
                q3_ms=q3,
                images_per_s=batch / median * 1e3,
                speedup=statistics.median(baseline.times_ms) / median if baseline else None,
                max_rel_diff=variant.max_rel_diff,
            )
            rows.append(row)
            log(
                f"{name:20s} {row.variant:20s} {row.median_ms:8.1f} ms  "
                f"{row.images_per_s:7.1f} img/s  {_ratio(row.speedup)}"
            )
        del runs
        if after_model is not None:
            after_model(rows)
    return rows


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); one time is all three."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, statistics.median(times), q3


def _ratio(speedup: float | None) -> str:
    return f"{speedup:.2f}x" if speedup is not None else "-"


def table(rows: list[Row]) -> list[str]:
    """The Markdown table of `rows`."""
    lines = [
        "| model | variant | input | ms / batch | img/s | vs torchvision eager | max rel diff |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.variant} | {r.layout} | {r.median_ms:.1f} "
            f"[{r.q1_ms:.1f}-{r.q3_ms:.1f}] | {r.images_per_s:.1f} | {_ratio(r.speedup)} | "
            f"{r.max_rel_diff:.1e} |"
        )
    return lines


def write_results(
    rows: list[Row], header: list[str], markdown: Path, plot: Path, device: str
) -> None:
    """This device's section of the Markdown file (other devices' sections are kept) and the
    plot of img/s relative to torchvision eager."""
    section = [
        f"## {device}",
        "",
        *header,
        "",
        "ms per batch: median [interquartile range]; max rel diff: max |variant - ours eager| / "
        "max |ours eager| on the timed input, checked before timing.",
        "",
        *table(rows),
    ]
    # `python -m benchmarks.training` keeps its section at the end of the same file.
    old, marker = (markdown.read_text() if markdown.is_file() else ""), f"\n{TRAINING_SECTION}\n"
    old, training = (
        (old[: old.index(marker)], old[old.index(marker) :]) if marker in old else (old, "")
    )
    sections = {device: "\n".join(section)}
    for part in old.split("\n## ")[1:]:  # keep the other devices' sections
        other = part.split("\n", 1)[0].strip()
        sections.setdefault(other, "## " + part.rstrip())
    text = "# Backbone inference benchmark\n\n" + "\n\n".join(sections[d] for d in sorted(sections))
    with atomic_path(markdown) as tmp:
        tmp.write_text(text + "\n" + training)
    _plot(rows, plot, device)


def _plot(rows: list[Row], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    labels = [label for label in VARIANTS.values() if any(r.variant == label for r in rows)]
    width = 0.8 / len(labels)
    fig, axis = plt.subplots(figsize=(max(6, 1.6 * len(models) * len(labels) / 3), 4.5))
    for i, label in enumerate(labels):
        cells = {r.model: r for r in rows if r.variant == label}
        xs = [m + (i - (len(labels) - 1) / 2) * width for m in range(len(models))]
        # without torchvision eager there is nothing to compare with: no bar
        heights = [(cells[m].speedup or 0.0) if m in cells else 0.0 for m in models]
        axis.bar(xs, heights, width, label=label)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(models)), models)
    axis.set_ylabel(f"img/s relative to torchvision eager ({device})")
    axis.legend(fontsize=8)
    axis.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
