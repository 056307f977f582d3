"""Training speed against a bare PyTorch loop, side by side in one process.

    python -m benchmarks.training                       # make train's setting, mobilenetv3 + fpn
    python -m benchmarks.training --setup "r50: backbone=resnet50 data.image_size=224 trainer=gpu"

For each setup (Hydra overrides of `train.py`), three runs train the same model (built by
`zootrain.build`) with the same batch, precision, memory format, optimiser and device:

- (a) bare: a plain loop over batches already on the device (uint8, as the loaders give
  them): normalise, autocast, forward, the task's loss, `backward`, `step`. What a user would
  write instead of this project.
- (b) lightning: `TaskModule` in a `Trainer` made as `train.py` makes it (callbacks, progress
  bar, CSV logger), fed the same device batches: the framework's cost.
- (c) pipeline: `zootrain.run.train(cfg)` itself, data module, loaders and all. Its first epoch
  draws the shapes scenes, later epochs read them from the cache; both are timed. Its train
  loader alone (second epoch, batches copied to the device) is timed once per setup: how much
  faster than training the data comes.

Each run is timed over `--steps` steps after `--warmup` steps (a device sync at both ends);
the rounds alternate the runs (order reversed every round) and the table gives each run's
fastest round: on a shared machine the noise only ever slows a run down (a neighbour's load
comes in blocks of seconds, longer than a window), so the fastest round is the one least
disturbed, as `timeit` advises; the ratios of the medians are printed below the table. Host
syncs per step are counted in one extra untimed run of each (`benchmarks.syncs`; on CUDA also
the driver's own sync warnings, `torch.cuda.set_sync_debug_mode`). It prints a table and
writes `training_<device>.md` and `.png` to `--out`; with the default `--out benchmarks` it
also updates the training section of `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from backbones.files import atomic_path
from backbones.tools.bench import TRAINING_SECTION, set_up_allocator
from benchmarks.syncs import HostSyncs, StepSyncs
from zootrain.build import build_datamodule, build_module, build_trainer
from zootrain.devices import resolve_device_defaults, trains_on_cuda
from zootrain.run import train

ROOT = Path(__file__).resolve().parents[1]
CPU_SETUPS = {
    "resnet18 64 px b32": [],  # make train
    "mobilenet_v3_large + fpn": ["backbone=mobilenetv3", "head=fpn"],
}
GPU_SETUPS = {
    "resnet50 224 px b256": ["backbone=resnet50", "data.image_size=224", "trainer=gpu"],
    "mobilenet_v3_large + fpn": ["backbone=mobilenetv3", "head=fpn", "trainer=gpu"],
}
RUNS = ("bare", "lightning", "pipeline epoch 1", "pipeline")
LOADER = "loader alone"  # timed once per setup, after the rounds


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The run config `python train.py overrides` composes, writing under `output_dir` (no
    model summary: a table per run, not a cost per step)."""
    overrides = ["trainer.enable_model_summary=false", *overrides]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    resolve_device_defaults(cfg)
    return cfg


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast of Lightning's `precision` (what the bare loop runs under)."""
    if precision in ("32-true", "32"):
        return contextlib.nullcontext()
    dtypes = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"the benchmark runs 32-true, bf16-mixed or 16-mixed, not {precision}")
    return torch.autocast(device.type, dtype=dtypes[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Cycle:
    """`length` batches, cycling through `batches`: a loader of in-memory device data."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.batches[i % len(self.batches)] for i in range(self.length))


class Window(L.Callback):
    """Times training steps `first` .. `first + steps - 1` of every epoch: from the start of
    the first to the start of the one after the last, the device synced at both ends
    (`device=None`: not synced, for the runs that count syncs). Register it first."""

    def __init__(self, first: int, steps: int, device: torch.device | None) -> None:
        self.first, self.steps, self.device = first, steps, device
        self.seconds: list[float] = []  # one per epoch
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, idx: int) -> None:
        if idx in (self.first, self.first + self.steps) and self.device is not None:
            synchronize(self.device)
        if idx == self.first:
            self._start = time.perf_counter()
        elif idx == self.first + self.steps:
            self.seconds.append(time.perf_counter() - self._start)


@dataclass
class Setup:
    """One benchmarked configuration and what was measured for it."""

    label: str
    overrides: list[str]
    seconds: dict[str, list[float]] = field(
        default_factory=lambda: {r: [] for r in (*RUNS, LOADER)}
    )
    syncs: dict[str, str] = field(default_factory=dict)
    images_per_step: int = 0

    def images_per_second(
        self, run: str, steps: int, statistic: Callable[[list[float]], float] = min
    ) -> float:
        """Images per second of `run`'s fastest round (or of another statistic of the rounds)."""
        return steps * self.images_per_step / statistic(self.seconds[run])


class Bench:
    """The three runs of one setup; `round` times each once, `count_syncs` counts their syncs."""

    def __init__(self, setup: Setup, warmup: int, steps: int, workdir: Path) -> None:
        self.setup, self.warmup, self.steps = setup, warmup, steps
        self.workdir = workdir
        self.cfg = compose_config(setup.overrides, workdir / "lightning")
        self.on_cuda = trains_on_cuda(self.cfg.trainer)
        self.device = torch.device("cuda" if self.on_cuda else "cpu")
        datamodule = build_datamodule(self.cfg)
        self.data = _Data(datamodule.num_classes, datamodule.mean, datamodule.std)
        # Two augmented batches, drawn in this process (a few seconds at 224 px, batch 256).
        loader = iter(datamodule.train_dataloader())
        self.batches = [tuple(t.to(self.device) for t in next(loader)) for _ in range(2)]
        setup.images_per_step = len(self.batches[0][0])

    def describe(self) -> str:
        t = self.cfg.trainer
        return (
            f"{self.cfg.backbone.name} + {self.cfg.head.name}, {self.cfg.data.image_size} px, "
            f"batch {self.setup.images_per_step}, {t.precision}, channels_last="
            f"{self.cfg.channels_last}, compile={self.cfg.compile}, {self.cfg.optim._target_}"
        )

    def bare(self, steps: int, syncs: HostSyncs | None = None) -> float:
        """(a): seconds for `steps` steps of a plain loop, after the warm-up steps."""
        torch.backends.cudnn.benchmark = bool(self.cfg.trainer.benchmark)
        torch.use_deterministic_algorithms(
            bool(self.cfg.trainer.deterministic),
            warn_only=self.cfg.trainer.deterministic == "warn",
        )
        holder = build_module(self.cfg, self.data)
        model = holder.model.to(self.device)
        if self.cfg.compile:
            model.compile()
        optimizer = holder.optimizer_factory(holder.parameter_groups())
        scaler = torch.amp.GradScaler(enabled=self.cfg.trainer.precision == "16-mixed")
        task, precision = holder.task, str(self.cfg.trainer.precision)
        model.train()
        start = 0.0
        for step in range(self.warmup + steps):
            if step == self.warmup:
                if syncs is None:
                    synchronize(self.device)
                else:
                    syncs.phase = "train step"
                start = time.perf_counter()
            x, y = self.batches[step % len(self.batches)]
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = holder.normalize(x)
            with autocast(precision, self.device):
                loss = sum(task.training_losses(model, x, y).values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if syncs is None:
            synchronize(self.device)
        else:
            syncs.phase = "outside fit"
        return time.perf_counter() - start

    def lightning(self, steps: int, extra: list[L.Callback], timed: bool = True) -> Window:
        """(b): our module and `train.py`'s trainer, on the device batches (one epoch)."""
        cfg = self.cfg.copy()
        with open_dict(cfg):  # one epoch of training only
            cfg.trainer.update(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0)
        module = build_module(cfg, self.data)
        window = Window(self.warmup, steps, self.device if timed else None)
        trainer = build_trainer(cfg, Path(cfg.paths.output_dir), module.task, [window, *extra])
        with warnings.catch_warnings():  # no validation here: the checkpoint has no metric
            warnings.filterwarnings("ignore", message=".*could not find the monitored key")
            batches = Cycle(self.batches, self.warmup + steps + 1)
            trainer.fit(module, train_dataloaders=batches)
        return window

    def _pipeline_config(self, steps: int, epochs: int, name: str) -> DictConfig:
        """`train.py`'s config with epochs of `warmup + steps + 1` steps, one val batch."""
        per_epoch = self.warmup + steps + 1
        overrides = [
            *self.setup.overrides,
            f"data.num_train={per_epoch * self.setup.images_per_step}",
            f"data.num_val={self.setup.images_per_step}",
            f"trainer.max_epochs={epochs}",
            "test_after_fit=false",
            "export_backbone=false",
            "pictures=false",  # written after the fit, untimed: wall time only
        ]
        return compose_config(overrides, self.workdir / name)

    def pipeline(
        self, steps: int, extra: list[L.Callback], run: int, epochs: int = 2, timed: bool = True
    ) -> Window:
        """(c): `zootrain.run.train`, two epochs (a fresh data module: the first draws the
        scenes)."""
        cfg = self._pipeline_config(steps, epochs, f"pipeline-{run}")
        window = Window(self.warmup, steps, self.device if timed else None)
        train(cfg, extra_callbacks=[window, *extra])
        return window

    def loader(self) -> float:
        """(c)'s train loader alone, in its second epoch (scenes cached), each batch copied to
        the device as Lightning does: seconds for `steps` batches after the warm-up ones."""
        cfg = self._pipeline_config(self.steps, 2, "loader")
        datamodule = build_datamodule(cfg)
        datamodule.trainer = L.Trainer(  # the loader settings follow the trainer's device
            accelerator=cfg.trainer.accelerator,
            devices=cfg.trainer.devices,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        loader = datamodule.train_dataloader()
        for _ in loader:  # the first epoch draws the scenes
            pass
        start = 0.0
        for step, batch in enumerate(loader):
            if step in (self.warmup, self.warmup + self.steps):
                synchronize(self.device)
            if step == self.warmup:
                start = time.perf_counter()
            elif step == self.warmup + self.steps:
                break
            for tensor in batch:
                tensor.to(self.device, non_blocking=True)
        return time.perf_counter() - start

    def round(self, order: list[str], run: int) -> None:
        for name in order:
            if name == "bare":
                self.setup.seconds["bare"].append(self.bare(self.steps))
            elif name == "lightning":
                self.setup.seconds["lightning"] += self.lightning(self.steps, []).seconds
            else:
                first, later = self.pipeline(self.steps, [], run).seconds
                self.setup.seconds["pipeline epoch 1"].append(first)
                self.setup.seconds["pipeline"].append(later)

    def count_syncs(self) -> None:
        """Host syncs per training step of each run (one untimed run each, two logging
        intervals long; the pipeline's in one epoch)."""
        length = 2 * max(1, self.cfg.trainer.log_every_n_steps)
        for name in ("bare", "lightning", "pipeline"):
            with HostSyncs(cuda=self.on_cuda) as syncs:
                phases = StepSyncs(syncs)
                if name == "bare":
                    self.bare(length, syncs)
                    steps = length
                elif name == "lightning":
                    self.lightning(length, [phases], timed=False)
                    steps = phases.steps
                else:
                    self.pipeline(length, [phases], run=-1, epochs=1, timed=False)
                    steps = phases.steps
            per_step = syncs.counts["train step"] / steps
            text = f"{per_step:.2f}"
            if self.on_cuda:
                text += f" ({syncs.cuda_counts['train step'] / steps:.2f} by CUDA)"
            self.setup.syncs[name] = text


class _Data:
    """What `build_module` reads from a data module."""

    def __init__(
        self, num_classes: int, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
    ) -> None:
        self.num_classes, self.mean, self.std = num_classes, mean, std


def table(setups: list[Setup], steps: int) -> list[str]:
    lines = [
        "| setup | a: bare img/s | b: lightning img/s | c: pipeline img/s (epoch 1) | "
        "c: pipeline img/s | loader alone img/s | b/a | c/a (epoch 1) | c/a | "
        "host syncs per step (a / b / c) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in setups:
        speed = {run: s.images_per_second(run, steps) for run in RUNS}
        loader = f"{s.images_per_second(LOADER, steps):.0f}" if s.seconds[LOADER] else "-"
        syncs = " / ".join(s.syncs.get(r, "-") for r in ("bare", "lightning", "pipeline"))
        lines.append(
            f"| {s.label} | {speed['bare']:.1f} | {speed['lightning']:.1f} | "
            f"{speed['pipeline epoch 1']:.1f} | {speed['pipeline']:.1f} | {loader} | "
            f"{speed['lightning'] / speed['bare']:.3f} | "
            f"{speed['pipeline epoch 1'] / speed['bare']:.3f} | "
            f"{speed['pipeline'] / speed['bare']:.3f} | {syncs} |"
        )
    lines.append("")
    for s in setups:
        median = {r: s.images_per_second(r, steps, statistics.median) for r in RUNS}
        lines.append(
            f"- {s.label}, medians of the rounds instead: b/a "
            f"{median['lightning'] / median['bare']:.3f}, c/a "
            f"{median['pipeline'] / median['bare']:.3f}"
        )
    return lines


def plot(setups: list[Setup], steps: int, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4 + 2.5 * len(setups), 4.5))
    width = 0.8 / len(RUNS)
    for i, run in enumerate(RUNS):
        values = [
            s.images_per_second(run, steps) / s.images_per_second("bare", steps) for s in setups
        ]
        bars = axis.bar([j + i * width for j in range(len(setups))], values, width, label=run)
        axis.bar_label(bars, fmt="%.2f", fontsize=8)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks([j + width * (len(RUNS) - 1) / 2 for j in range(len(setups))])
    axis.set_xticklabels([s.label for s in setups])
    axis.set_ylabel(f"images/s relative to the bare loop ({device})")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def update_results(results: Path, section: list[str]) -> None:
    """Replace the training section of RESULTS.md (everything from its heading on)."""
    text = results.read_text() if results.is_file() else ""
    kept = text.split(f"\n{TRAINING_SECTION}\n")[0].rstrip("\n")
    with atomic_path(results) as tmp:
        tmp.write_text(f"{kept}\n\n{TRAINING_SECTION}\n\n" + "\n".join(section) + "\n")


def main(argv: list[str] | None = None) -> list[Setup]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.training", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--setup",
        action="append",
        metavar="'LABEL: OVERRIDE ...'",
        help="a setup: a label and train.py overrides (repeatable); default: by device",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each window")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run and round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--name", help="file name stem of the table and plot (training_<device>)")
    parser.add_argument("--no-syncs", action="store_true", help="skip the sync-counting runs")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every setup")
    args = parser.parse_args(argv)
    if args.setup:
        chosen = dict(spec.split(":", 1) for spec in args.setup)
        setups = [Setup(k.strip(), v.split()) for k, v in chosen.items()]
    else:
        defaults = GPU_SETUPS if torch.cuda.is_available() else CPU_SETUPS
        setups = [Setup(label, list(o)) for label, o in defaults.items()]
    allocator = set_up_allocator() if not torch.cuda.is_available() else "allocator: CUDA caching"
    command = " ".join(
        ["python -m benchmarks.training", *(argv if argv is not None else sys.argv[1:])]
    )
    described: list[str] = []
    done: list[Setup] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, setup in enumerate(setups):
            setup.overrides = [*setup.overrides, *args.overrides]
            bench = Bench(setup, args.warmup, args.steps, Path(tmp) / str(i))
            described.append(f"- {setup.label}: {bench.describe()}")
            for run in range(args.rounds):
                order = ["bare", "lightning", "pipeline"]
                bench.round(order if run % 2 == 0 else order[::-1], run)
                print(f"{setup.label}: round {run + 1}/{args.rounds} done", flush=True)
            setup.seconds[LOADER].append(bench.loader())
            done.append(setup)
            # Written after every measurement: a run cut short keeps what it measured.
            section = report(done, described, args, command, allocator, bench.device)
            write(section, done, args, bench.device)
            if not args.no_syncs:
                try:
                    bench.count_syncs()
                except Exception:  # the speeds stand without the counts; say why they are missing
                    traceback.print_exc()
                    setup.syncs = {run: "failed" for run in ("bare", "lightning", "pipeline")}
                section = report(done, described, args, command, allocator, bench.device)
                write(section, done, args, bench.device)
    print("\n".join(section))
    return setups


def report(
    setups: list[Setup],
    described: list[str],
    args: argparse.Namespace,
    command: str,
    allocator: str,
    device: torch.device,
) -> list[str]:
    """The Markdown section: how it was run, then the table."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return [
        f"`{command}`",
        "",
        f"- {device.type}: {name}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"lightning {L.__version__}; {allocator}",
        f"- {args.rounds} rounds (order alternating), each run timed over {args.steps} steps "
        f"after {args.warmup} warm-up steps; the table: each run's fastest round",
        *described,
        "- a: bare loop on device batches; b: TaskModule + train.py's Trainer on the same "
        "batches; c: train.train, whole data pipeline (epoch 1 draws the scenes, epoch 2 reads "
        "the cache); loader alone: c's train loader in its second epoch, batches copied to the "
        "device, timed once; host syncs counted in the training steps (benchmarks/syncs.py)",
        "",
        *table(setups, args.steps),
    ]


def write(
    section: list[str], setups: list[Setup], args: argparse.Namespace, device: torch.device
) -> None:
    stem = args.name or f"training_{device.type}"
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / f"{stem}.md") as tmp:
        tmp.write_text("\n".join(section) + "\n")
    plot(setups, args.steps, args.out / f"{stem}.png", device.type)
    if args.out.resolve() == (ROOT / "benchmarks").resolve() and args.name is None:
        update_results(args.out / "RESULTS.md", section)


if __name__ == "__main__":
    main()
