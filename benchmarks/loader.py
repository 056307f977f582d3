"""Data loading: the old reading against the new, side by side in one process, on generated
ImageNet-like JPEGs (nothing is downloaded).

    python -m benchmarks.loader                       # folders in a temporary directory
    python -m benchmarks.loader --root /tmp/loader --rounds 9 --workers 1 2 auto

- two plain pipelines, both torchvision's ImageFolder (PIL decodes, RGB) through transforms.v2
  RandomResizedCrop, horizontal flip, ToDtype(float32) and Normalize into float32 batches:
  - reference: as torchvision's reference training scripts build it (their default `--backend
    pil`): crop and flip on the PIL image, then PILToTensor;
  - old: ToImage first, then v2's tensor kernels (what this project did before #27; faster).
- new: `ImageFolderDataModule`'s train loader: decode_jpeg, the same crop and flip in uint8,
  uint8 batches (what crosses to the device); normalised there afterwards, which the "+ norm on
  CPU" row does on this CPU instead (a machine without a GPU).

Per core: the loaders in the main process (num_workers=0) with one torch thread, timed by the
thread's CPU clock (a neighbour's load does not count, their cache traffic does), in rounds
that alternate the order; each run's best round and the median are given. Workers: wall-clock
images/s with 1, 2 and `auto` worker processes (`auto` as on a GPU node: the usable cores less
one, at most 8), timed after the batches prefetched while the workers started. Bytes: what one batch of 256 moves
to the device. Set-up: a 20,000-file tree (hard links to the photos: listing, not reading)
set up by torchvision's ImageFolder, by the data module, and by the header scan the data module
did before (every file opened by PIL, 8 threads), extrapolated linearly to ImageNet's 1.28M
files. With the default `--out benchmarks` the table replaces the loader section of
`benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from backbones import IMAGENET_MEAN, IMAGENET_STD
from backbones.files import atomic_path
from zootrain.data.base import loader_workers
from zootrain.data.imagefolder import ImageFolderDataModule
from zootrain.data.images import read_image
from zootrain.data.transforms import DeviceNormalize, stack_images

ROOT = Path(__file__).resolve().parents[1]
SECTION = "# Loader benchmark"
IMAGENET_FILES = 1_281_167
WIDTH, HEIGHT, QUALITY = 500, 375, 90  # ImageNet's most common size
REFERENCE = "reference: v2 on PIL images, float32"
OLD = "old: PIL decode, v2 on tensors, float32"
NEW = "new: decode_jpeg, the uint8 preset"


def photograph(rng: np.random.Generator) -> np.ndarray:
    """A (375, 500, 3) uint8 image with a photograph's 1/f amplitude spectrum and correlated
    colours, which JPEG-compresses like one (~80 KB at quality 90, as ImageNet's average)."""
    fy, fx = np.fft.fftfreq(HEIGHT)[:, None], np.fft.rfftfreq(WIDTH)[None]
    falloff = np.hypot(fx, fy)
    falloff[0, 0] = 1.0
    spectra = rng.normal(size=(3, *falloff.shape)) + 1j * rng.normal(size=(3, *falloff.shape))
    pixels = np.fft.irfft2(spectra / falloff**1.25, s=(HEIGHT, WIDTH)).transpose(1, 2, 0)
    pixels = pixels @ (np.eye(3) + 0.3 * rng.normal(size=(3, 3)))  # colours that go together
    pixels = 128 + 50 * (pixels - pixels.mean()) / pixels.std()
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> list[Path]:
    """root/{train,val}/<class>/<n>.jpg photographs (val a fifth of train); reused when there."""
    rng = np.random.default_rng(seed)
    written = []
    for split, count in (("train", per_class), ("val", max(1, per_class // 5))):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                path = folder / f"{n:05d}.jpg"
                if not path.is_file():
                    Image.fromarray(photograph(rng)).save(path, quality=QUALITY)
                written.append(path)
    return written


def make_tree(root: Path, photos: list[Path], files: int, classes: int = 100) -> None:
    """A folder of `files` hard links to `photos` (train 90%, val 10%, `classes` classes)."""
    done = root / f"{files}-files.done"  # what an earlier run made here, if anything
    if done.is_file():
        return
    if root.exists():
        shutil.rmtree(root)
    per_class = {"train": files * 9 // 10 // classes, "val": files // 10 // classes}
    n = 0
    for split, count in per_class.items():
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                link = folder / f"n{c:08d}_{i}.JPEG"
                if not link.exists():
                    os.link(photos[n % len(photos)], link)
                n += 1
    done.touch()


def plain_loader(
    root: Path, batch_size: int, workers: int, image_size: int, on_pil_images: bool
) -> DataLoader:
    """torchvision's ImageFolder with a float32 train preset: crop and flip on the PIL image,
    then PILToTensor (`on_pil_images`, the reference), or ToImage first (the old reading)."""
    geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    steps = [*geometry, v2.PILToTensor()] if on_pil_images else [v2.ToImage(), *geometry]
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    folder = datasets.ImageFolder(str(root / "train"), transform=v2.Compose(steps + to_float))
    return DataLoader(
        folder, batch_size=batch_size, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0,
    )  # fmt: skip


reference_loader = partial(plain_loader, on_pil_images=True)
old_loader = partial(plain_loader, on_pil_images=False)


def new_loader(root: Path, batch_size: int, workers: int, image_size: int) -> DataLoader:
    """The data module's train loader (uint8 batches)."""
    datamodule = ImageFolderDataModule(
        "classification", root, image_size=image_size, batch_size=batch_size,
        num_workers=workers,
    )  # fmt: skip
    datamodule.setup()
    return datamodule.train_dataloader()


def batches(loader: DataLoader, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches from `epoch` on, one epoch after another (a run longer than the
    folder reads it again, as training does)."""
    for n in itertools.count():
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(1000 * epoch + n)  # what Lightning does before each epoch
        yield from loader


def images_per_second(
    loader: DataLoader, count: int, epoch: int, clock: Callable[[], float], skip: int = 0,
    after: Callable[[torch.Tensor], object] = lambda x: x,
) -> float:  # fmt: skip
    """Images/s of `count` images read after `skip` batches (`after` applied to each batch)."""
    it = batches(loader, epoch)
    for _ in range(skip):
        next(it)
    start, seen = clock(), 0
    for images, _ in it:
        after(images)
        seen += len(images)
        if seen >= count:
            break
    return seen / (clock() - start)


class Runs:
    """Per-run lists of results over alternating rounds."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def best(self, name: str, higher: bool = True) -> float:
        return (max if higher else min)(self.values[name])

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])


def alternate(runs: dict[str, Callable[[int], float]], rounds: int, into: Runs) -> None:
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            into.add(name, runs[name](r))


def per_core(root: Path, args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    torch.set_num_threads(1)
    reference = reference_loader(root, args.batch_size, 0, args.image_size)
    old = old_loader(root, args.batch_size, 0, args.image_size)
    new = new_loader(root, args.batch_size, 0, args.image_size)
    normalize = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD)
    count = args.images
    runs = {
        REFERENCE: lambda r: images_per_second(reference, count, r, time.thread_time),
        OLD: lambda r: images_per_second(old, count, r, time.thread_time),
        NEW: lambda r: images_per_second(new, count, r, time.thread_time),
        "new + norm on CPU": lambda r: images_per_second(
            new, count, r, time.thread_time, after=normalize
        ),
    }
    results = Runs()
    alternate(runs, args.rounds, results)
    lines = [
        "| train loader, num_workers=0, 1 thread | img/s per core (best) | (median) | "
        "x reference (best) | x reference (median) | x old (best) | x old (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in runs:
        cells = [f"{results.best(name):.0f}", f"{results.median(name):.0f}"]
        for base in (REFERENCE, OLD):
            cells.append(f"{results.best(name) / results.best(base):.2f}")
            cells.append(f"{results.median(name) / results.median(base):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratios = {
        "per core, x reference": results.best(NEW) / results.best(REFERENCE),
        "per core, x old": results.best(NEW) / results.best(OLD),
    }
    return lines, ratios


def pil_rgb(path: str) -> Image.Image:
    """The image at `path` decoded by PIL in RGB, as torchvision's ImageFolder reads it."""
    with Image.open(path) as image:
        return image.convert("RGB")


def stages(root: Path, args: argparse.Namespace) -> list[str]:
    """Each stage alone, per image (thread CPU time, one thread, median of the rounds): where
    the time of each loader goes."""
    torch.set_num_threads(1)
    datamodule = ImageFolderDataModule("classification", root, image_size=args.image_size)
    datamodule.setup()
    files = datamodule.splits["train"].dataset
    paths = [files.path(i) for i in range(min(len(files), args.images))]
    preset = datamodule.splits["train"].transforms  # RandomResizedCrop + flip
    v2_geometry = v2.Compose([v2.RandomResizedCrop(args.image_size, antialias=True),
                              v2.RandomHorizontalFlip()])  # fmt: skip
    decoded = [read_image(p) for p in paths]
    photos = [pil_rgb(p) for p in paths]
    crops = [preset(image, 0)[0] for image in decoded]
    planar = [crop.contiguous() for crop in crops]
    to_float = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    floats = [to_float(crop) for crop in planar]
    size = args.batch_size
    normalize = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD)
    uint8_batch = stack_images(crops[:size])

    def pil(path: str) -> torch.Tensor:
        return v2.functional.to_image(pil_rgb(path))

    timed = {  # (what it does, the items it runs over, images per item)
        "read: PIL decode, RGB (reference)": (pil_rgb, paths, 1),
        "read: PIL decode, RGB, ToImage (old)": (pil, paths, 1),
        "read: decode_jpeg (new)": (read_image, paths, 1),
        "RandomResizedCrop + flip on PIL images (reference)": (v2_geometry, photos, 1),
        "RandomResizedCrop + flip, v2 on uint8 tensors (old)": (v2_geometry, decoded, 1),
        "RandomResizedCrop + flip, the preset (new)": (lambda i: preset(i, 0)[0], decoded, 1),
        "ToDtype(float32) + Normalize per image (reference, old)": (to_float, planar, 1),
        "collate float32 (reference, old)": (lambda i: torch.stack(floats[:size]), range(4), size),
        "collate uint8, channels last (new)": (lambda i: stack_images(crops[:size]), range(4), size),
        "normalise a uint8 batch on the CPU (new, without a GPU)": (
            lambda i: normalize(uint8_batch), range(4), size),
    }  # fmt: skip
    runs = Runs()
    for _ in range(args.rounds):
        for name, (step, items, per_item) in timed.items():
            start = time.thread_time()
            for item in items:
                step(item)
            runs.add(name, (time.thread_time() - start) / (len(items) * per_item))
    lines = ["| stage, per image | ms (median) |", "|---|---:|"]
    lines += [f"| {name} | {1e3 * runs.median(name):.3f} |" for name in timed]
    return lines


def with_workers(root: Path, args: argparse.Namespace) -> list[str]:
    torch.set_num_threads(1)
    counts = []
    for w in args.workers:
        counts.append(
            (f"auto ({loader_workers('auto', on_cuda=True)})", loader_workers("auto", True))
            if w == "auto"
            else (w, int(w))
        )
    lines = [
        "| train loader, wall clock | " + " | ".join(f"{n} workers" for n, _ in counts) + " |",
        "|---|" + "---:|" * len(counts),
    ]
    results = Runs()
    for label, workers in counts:
        loaders = {
            "reference": reference_loader(root, args.batch_size, workers, args.image_size),
            "old": old_loader(root, args.batch_size, workers, args.image_size),
            "new": new_loader(root, args.batch_size, workers, args.image_size),
        }
        runs = {
            f"{name} {label}": (
                lambda r, loader=loader, workers=workers: images_per_second(
                    # past the batches the workers prefetched while starting: the steady rate
                    loader,
                    2 * args.images,
                    r,
                    time.perf_counter,
                    skip=2 * workers + 1,
                )
            )
            for name, loader in loaders.items()
        }
        alternate(runs, max(1, args.rounds // 3), results)
        del runs, loaders
        gc.collect()  # their worker processes end before the next count starts
    for name in ("reference", "old", "new"):
        cells = [f"{results.best(f'{name} {label}'):.0f}" for label, _ in counts]
        lines.append(f"| {name} img/s (best round) | " + " | ".join(cells) + " |")
    return lines


def bytes_moved(root: Path, args: argparse.Namespace) -> list[str]:
    """Bytes of one batch of 256 images (and labels) as each loader hands it to the device."""
    lines = ["| one batch of 256 at the device | images | labels | total |", "|---|---:|---:|---:|"]
    for name, make in (("old (float32)", old_loader), ("new (uint8)", new_loader)):
        images, labels = next(batches(make(root, 4, 0, args.image_size), 0))
        per_image, per_label = images[0].nbytes, labels[0].nbytes
        lines.append(
            f"| {name} | {256 * per_image / 2**20:.1f} MiB | {256 * per_label} B | "
            f"{256 * (per_image + per_label) / 2**20:.1f} MiB |"
        )
    return lines


def header_scan(root: Path) -> int:
    """What ImageFolderDataModule's set-up did before: every file opened by PIL (its header)."""
    paths = [str(p) for split in ("train", "val") for p in sorted((root / split).rglob("*.*"))]

    def problem(path: str) -> str | None:
        try:
            with Image.open(path) as image:
                _ = image.size  # the header, read by open
        except Exception as error:
            return str(error)
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return sum(p is None for p in pool.map(problem, paths))


def set_up(tree: Path, files: int, args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    def timed(step: Callable[[], object]) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    runs = {
        "torchvision ImageFolder (train + val)": lambda r: timed(
            lambda: [datasets.ImageFolder(str(tree / s)) for s in ("train", "val")]
        ),
        "ImageFolderDataModule.setup (a directory walk)": lambda r: timed(
            lambda: ImageFolderDataModule("classification", tree).setup()
        ),
        "before #27: every header opened (8 threads)": lambda r: timed(lambda: header_scan(tree)),
    }
    results = Runs()
    alternate(runs, args.rounds, results)
    base = "torchvision ImageFolder (train + val)"
    lines = [
        f"| set-up of {files:,} files | s (best) | s (median) | x torchvision (best) | "
        f"extrapolated to {IMAGENET_FILES:,} files |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in runs:
        best = results.best(name, higher=False)
        lines.append(
            f"| {name} | {best:.3f} | {results.median(name):.3f} | "
            f"{best / results.best(base, higher=False):.2f} | "
            f"{best * IMAGENET_FILES / files:.0f} s |"
        )
    ours = "ImageFolderDataModule.setup (a directory walk)"
    ratios = {"set-up": results.best(ours, higher=False) / results.best(base, higher=False)}
    return lines, ratios


def machine() -> str:
    model = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} usable cores"


def update_results(results: Path, section: list[str]) -> None:
    """Put the loader section into RESULTS.md: in place of the old one, else before the training
    section (whose writer, benchmarks/training.py, rewrites everything from its heading on)."""
    text = results.read_text() if results.is_file() else ""
    parts = [p for p in re.split(r"(?m)^(?=# )", text) if p]  # any preamble, then sections
    body = f"{SECTION}\n\n" + "\n".join(section) + "\n"
    headings = [part.split("\n", 1)[0] for part in parts]
    if SECTION in headings:
        parts[headings.index(SECTION)] = body
    elif "# Training benchmark" in headings:
        parts.insert(headings.index("# Training benchmark"), body)
    else:
        parts.append(body)
    with atomic_path(results) as tmp:  # one blank line between sections
        tmp.write_text("\n".join(part.rstrip("\n") + "\n" for part in parts))


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loader", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--root", type=Path, help="where the folders are made (kept); default: temp"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=256, help="images timed per run and round")
    parser.add_argument("--photos", type=int, default=512, help="distinct JPEGs generated")
    parser.add_argument("--files", type=int, default=20_000, help="files of the set-up tree")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", nargs="*", default=["1", "2", "auto"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.loader", *(sys.argv[1:] if argv is None else argv)])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as temporary:
        root = args.root or Path(temporary)
        classes = 8
        photos = make_folder(root / "photos", classes, args.photos // classes * 5 // 6)
        sizes = [p.stat().st_size for p in photos]
        print(f"{len(photos)} photos, {np.mean(sizes) / 1e3:.0f} KB on average", flush=True)
        core_lines, ratios = per_core(root / "photos", args)
        print("\n".join(core_lines), flush=True)
        stage_lines = stages(root / "photos", args)
        print("\n".join(stage_lines), flush=True)
        worker_lines = with_workers(root / "photos", args)
        print("\n".join(worker_lines), flush=True)
        byte_lines = bytes_moved(root / "photos", args)
        make_tree(root / "tree", photos, args.files)
        setup_lines, setup_ratio = set_up(root / "tree", args.files, args)
        ratios.update(setup_ratio)
    load_after = os.getloadavg()
    section = [
        f"`{command}`",
        "",
        f"- {machine()}; load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} "
        f"at the end; torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Pillow {Image.__version__}",
        f"- {len(photos)} generated {WIDTH}x{HEIGHT} JPEGs, quality {QUALITY}, "
        f"{np.mean(sizes) / 1e3:.0f} KB on average, {classes} classes; {args.image_size} px "
        f"crops, batch {args.batch_size}, {args.images} images per run and round, "
        f"{args.rounds} rounds in alternating order",
        "",
        *core_lines,
        "",
        *stage_lines,
        "",
        *worker_lines,
        "",
        *byte_lines,
        "",
        *setup_lines,
        "",
        f"- new per core (target >= 1.8x): {ratios['per core, x reference']:.2f}x the reference "
        f"pipeline, {ratios['per core, x old']:.2f}x the old one; set-up / torchvision's: "
        f"{ratios['set-up']:.2f}x (target <= 1.5x)",
    ]
    print("\n".join(section))
    if args.out.resolve() == (ROOT / "benchmarks").resolve():
        update_results(args.out / "RESULTS.md", section)
    return section


if __name__ == "__main__":
    main()
