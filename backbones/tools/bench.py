"""Inference speed of our backbones against torchvision's and timm's, side by side in one process.

Every implementation runs the features part only (torchvision: `features`, or the children up
to the last stage; timm: `forward_features`; ours: C5) on the same input; ours and
torchvision's share weights (torchvision's random init, converted) and are checked to compute
the same output (torchvision's DenseNet gets the final ReLU its `forward` applies, which our C5
includes; see `_like_ours`). After warm-up runs, the
variants of one model are timed in alternation (the order reversed every round), so load from
other processes hits them alike; tables give the median with the interquartile range.

CPU timings are set up against allocator noise: glibc's malloc returns large blocks to the
system and maps them afresh (page faults on every large activation), which swings a model by
20-60% between repeats. `set_up_allocator` keeps freed memory in the heap instead (mallopt).
On GPU: CUDA events, bf16 autocast, channels_last, optional torch.compile.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .._base import create, get_entry
from ..weights import atomic_path, convert
from .summary import meta_backbone, summarize

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


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

    model: str
    implementation: str  # torchvision, timm, ours
    setting: str  # contiguous, channels_last, fused + channels_last, bf16 ...
    run: Callable[[], object]
    times_ms: list[float]


@dataclass(frozen=True)
class Row:
    model: str
    implementation: str
    setting: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    images_per_s: float
    peak_mib: float | None
    gflops_per_image: float
    params_m: float
    peak_fraction: float  # achieved FLOP/s over the matmul peak


def _timm_features(name: str) -> nn.Module:
    import timm

    model = timm.create_model(get_entry(name).sources["timm"])

    class ForwardFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.forward_features(x)

    return ForwardFeatures()


def build_implementations(name: str) -> dict[str, nn.Module]:
    """{implementation: eval-mode features module}; ours gets torchvision's weights."""
    torch.manual_seed(0)
    ours = create(name, out_features=("C5",)).eval()
    built = {"ours": ours}
    sources = get_entry(name).sources
    if "torchvision" in sources:
        import torchvision

        reference = torchvision.models.get_model(name).eval()
        weights = convert(name, reference.state_dict())
        ours.load_state_dict(
            {
                k.removeprefix("backbone."): v
                for k, v in weights.items()
                if k.startswith("backbone.")
            }
        )
        built["torchvision"] = _like_ours(_features_of(reference), ours, name)
    if "timm" in sources:
        built["timm"] = _timm_features(name).eval()
    return built


def _features_of(reference: nn.Module) -> nn.Module:
    if hasattr(reference, "features"):
        return reference.features
    return nn.Sequential(*list(reference.children())[:-2])


def _like_ours(features: nn.Module, ours: nn.Module, name: str) -> nn.Module:
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
    for candidate, extended in ((theirs, features), (theirs.relu(), _WithReLU(features))):
        if candidate.shape == expected.shape and torch.allclose(
            candidate, expected, rtol=1e-4, atol=1e-5
        ):
            return extended
    raise RuntimeError(
        f"torchvision's {name} features do not compute our C5 (with or without a final ReLU): "
        "the benchmark would compare different work"
    )


class _WithReLU(nn.Module):
    """torchvision features followed by the ReLU its `forward` applies (DenseNet)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.features(x))


class _PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors allocated while active (views share their base's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [bytes, live tensors on it]
        self.current = self.peak = 0

    def _release(self, pointer: int) -> None:
        entry = self.live[pointer]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[pointer]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if not isinstance(tensor, torch.Tensor) or tensor.is_mkldnn:
                continue
            pointer = tensor.untyped_storage().data_ptr()
            if pointer not in self.live:
                self.live[pointer] = [tensor.untyped_storage().nbytes(), 0]
                self.current += self.live[pointer][0]
                self.peak = max(self.peak, self.current)
            self.live[pointer][1] += 1
            weakref.finalize(tensor, self._release, pointer)
        return out


def peak_memory_mib(run: Callable[[], object], device: torch.device) -> float:
    """Peak memory of the tensors one run allocates (CPU: traced; CUDA: the allocator's)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    mode = _PeakMemory()
    with mode:
        run()
    return mode.peak / 2**20


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Achieved GFLOP/s of a large square matmul: the machine's practical compute peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = _cuda_timer if device.type == "cuda" else _cpu_timer
    times = [timer(lambda: torch.mm(a, b)) for _ in range(7)][2:]
    return 2 * n**3 / (statistics.median(times) / 1e3) / 1e9


def _cpu_timer(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def _cuda_timer(run: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def variants(
    name: str, batch: int, size: int, device: torch.device, compile: bool = False
) -> list[Variant]:
    """Every implementation of `name` in each setting worth comparing on `device`."""
    implementations = build_implementations(name)
    x = torch.randn(batch, 3, size, size, device=device)
    found = []

    def add(implementation: str, setting: str, model: nn.Module, inp: torch.Tensor) -> None:
        def run() -> object:
            with torch.inference_mode():
                if device.type == "cuda":
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        return model(inp)
                return model(inp)

        found.append(Variant(name, implementation, setting, run, []))

    cl = torch.channels_last
    for implementation, model in implementations.items():
        model = model.to(device)
        if device.type == "cuda":  # the fast settings only: bf16, channels_last
            model = model.to(memory_format=cl)
            add(implementation, "bf16 channels_last", model, x.to(memory_format=cl))
            if compile:
                add(implementation, "bf16 channels_last compiled", torch.compile(model), x)
        else:
            add(implementation, "contiguous", model, x)
            add(
                implementation,
                "channels_last",
                copy.deepcopy(model).to(memory_format=cl),
                x.to(memory_format=cl),
            )
        if implementation == "ours":
            fused = copy.deepcopy(implementations["ours"]).to(device).fuse()
            setting = "fused bf16 channels_last" if device.type == "cuda" else "fused channels_last"
            add(implementation, setting, fused, x.to(memory_format=cl))
    return found


def measure(
    names: list[str],
    batch: int,
    size: int,
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    compile: bool = False,
    log: Callable[[str], None] = print,
    after_model: Callable[[list[Row], float], None] | None = None,
) -> tuple[list[Row], float]:
    """Time every variant of every model: one `Row` each, and the matmul peak in GFLOP/s.

    `after_model(rows so far, peak)` runs after each model, e.g. to save partial results.
    """
    timer = _cuda_timer if device.type == "cuda" else _cpu_timer
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_gflops(device, dtype)
    log(f"matmul peak ({dtype}, {device.type}): {peak:.0f} GFLOP/s")
    rows = []
    for name in names:
        levels = summarize(name, size)
        flops = sum(level.flops for level in levels)  # per image
        with torch.device("meta"):
            params = sum(p.numel() for p in meta_backbone(name).parameters())
        runs = variants(name, batch, size, device, compile)
        for _ in range(warmup):
            for variant in runs:
                variant.run()
        for round_ in range(repeats):
            for variant in runs if round_ % 2 == 0 else reversed(runs):
                variant.times_ms.append(timer(variant.run))
        for variant in runs:
            q1, median, q3 = statistics.quantiles(variant.times_ms, n=4)
            row = Row(
                model=name,
                implementation=variant.implementation,
                setting=variant.setting,
                median_ms=median,
                q1_ms=q1,
                q3_ms=q3,
                images_per_s=batch / median * 1e3,
                peak_mib=peak_memory_mib(variant.run, device),
                gflops_per_image=flops / 1e9,
                params_m=params / 1e6,
                peak_fraction=flops * batch / (median / 1e3) / 1e9 / peak,
            )
            rows.append(row)
            log(
                f"{name:20s} {row.implementation:12s} {row.setting:28s} "
                f"{row.median_ms:8.1f} ms  {row.images_per_s:7.1f} img/s"
            )
        del runs
        if after_model is not None:
            after_model(rows, peak)
    return rows, peak


def ratios(rows: list[Row]) -> list[tuple[str, str, float, str]]:
    """(model, comparison, ratio, target) for the targets of the issue, per model."""
    found = []
    by_model: dict[str, dict[tuple[str, str], Row]] = {}
    for row in rows:
        by_model.setdefault(row.model, {})[(row.implementation, row.setting)] = row
    for model, cells in by_model.items():
        if ("torchvision", "contiguous") not in cells:
            continue
        for setting in ("contiguous", "channels_last"):
            ours, theirs = cells[("ours", setting)], cells[("torchvision", setting)]
            found.append(
                (
                    model,
                    f"ours / torchvision, {setting}",
                    ours.images_per_s / theirs.images_per_s,
                    ">= 0.97",
                )
            )
        best = max(cells[("torchvision", s)].images_per_s for s in ("contiguous", "channels_last"))
        fused = cells[("ours", "fused channels_last")]
        # the fused target is for networks with BatchNorm to fold
        target = ">= 1.15" if _has_batchnorm(model) else "none (no BatchNorm)"
        found.append((model, "ours fused / torchvision's best", fused.images_per_s / best, target))
    return found


def _has_batchnorm(name: str) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in meta_backbone(name).modules())


def write_results(
    rows: list[Row], peak: float, header: list[str], markdown: Path, plot: Path, device: str
) -> None:
    """The Markdown table (one section per device) and the img/s vs GFLOPs / params plot."""
    lines = ["# Backbone inference benchmark", "", *header, ""]
    lines += [
        f"## {device}",
        "",
        f"Matmul peak: {peak:.0f} GFLOP/s. ms per batch: median [interquartile range]; peak "
        "memory: the tensors one forward pass allocates (weights excluded); GFLOP/s as a "
        "fraction of the matmul peak. GFLOPs are those of the network as written; a fused "
        "model does fewer (Winograd 3x3 convs, pools before 1x1 convs), so its fraction is "
        "nominal and can pass 100%.",
        "",
        "| model | implementation | setting | ms / batch | img/s | peak memory | GFLOPs / img | params | % of matmul peak |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        memory = f"{r.peak_mib:,.0f} MiB" if r.peak_mib is not None else "-"
        lines.append(
            f"| {r.model} | {r.implementation} | {r.setting} | {r.median_ms:.1f} "
            f"[{r.q1_ms:.1f}-{r.q3_ms:.1f}] | {r.images_per_s:.1f} | {memory} | "
            f"{r.gflops_per_image:.3g} | {r.params_m:.1f}M | {100 * r.peak_fraction:.0f}% |"
        )
    if device == "cpu":
        lines += ["", "Targets (img/s ratios of the medians above):", ""]
        lines += ["| model | comparison | ratio | target |", "|---|---|---:|---|"]
        for model, comparison, ratio, target in ratios(rows):
            missed = target.startswith(">=") and ratio < float(target.split()[-1])
            lines.append(
                f"| {model} | {comparison} | {ratio:.2f} | {target}{' (missed)' if missed else ''} |"
            )
    lines.append("")
    # `python -m training.bench` keeps its section at the end of the same file.
    old, marker = (markdown.read_text() if markdown.is_file() else ""), "\n# Training benchmark\n"
    training = old[old.index(marker) :] if marker in old else ""
    with atomic_path(markdown) as tmp:
        tmp.write_text("\n".join(lines) + training)
    _plot(rows, plot, device)


def _plot(rows: list[Row], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[tuple[str, str], Row] = {}  # (model, implementation) -> fastest setting
    for row in rows:
        key = (row.model, row.implementation if "fused" not in row.setting else "ours fused")
        if key not in best or row.images_per_s > best[key].images_per_s:
            best[key] = row
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    markers = {"torchvision": "o", "timm": "s", "ours": "^", "ours fused": "*"}
    for axis, attribute, label in (
        (axes[0], "gflops_per_image", "GFLOPs per image"),
        (axes[1], "params_m", "parameters (millions)"),
    ):
        for implementation, marker in markers.items():
            points = [r for (_, i), r in best.items() if i == implementation]
            axis.scatter(
                [getattr(r, attribute) for r in points],
                [r.images_per_s for r in points],
                marker=marker,
                label=implementation,
                s=60 if marker != "*" else 120,
            )
        for (model, implementation), r in best.items():
            if implementation == "ours":
                axis.annotate(model, (getattr(r, attribute), r.images_per_s), fontsize=8)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"images / s ({device}, best setting of each)")
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
