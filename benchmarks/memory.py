"""Peak training memory of a backbone on CPU: plain, memory-efficient, grad-checkpointed.

python benchmarks/memory.py densenet121 --batch 8 --size 224

Each setting runs one forward + backward in a fresh process, so that the process's peak
resident memory (ru_maxrss) is that step's and no earlier one's. Two numbers per row:
- saved for backward: bytes of the distinct activation tensors autograd stores during the
  forward pass (exact, from `saved_tensors_hooks`, weights left out; what a checkpointed region
  recomputes is not stored, its inputs are);
- peak RSS increase: the process's peak resident memory during forward + backward, minus its
  resident memory before (includes gradients and the allocator's slack).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource

import torch
from rich.console import Console
from rich.table import Table

from backbones import create

SETTINGS = {
    "plain": {},
    "memory_efficient": {"memory_efficient": True},
    "grad checkpointing": {"checkpoint": True},
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _measure(name: str, batch: int, size: int, setting: dict, queue: mp.Queue) -> None:
    torch.manual_seed(0)
    setting = dict(setting)
    checkpointing = setting.pop("checkpoint", False)
    model = create(name, out_features=("C5",), **setting).train()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(batch, 3, size, size)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stored: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # weights are there anyway: count activations
            stored[storage.data_ptr()] = storage.nbytes()
        return t

    before = _rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)["C5"]
    out.float().pow(2).mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    queue.put((sum(stored.values()), peak - before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    table = Table(title=f"training step, batch {args.batch} x {args.size}x{args.size}, CPU")
    for column in ("backbone", "setting", "saved for backward", "peak RSS increase"):
        table.add_column(column, justify="left" if column in ("backbone", "setting") else "right")
    context = mp.get_context("spawn")
    for name in args.names:
        for label, setting in SETTINGS.items():
            try:
                with torch.device("meta"):
                    create(name, **{k: v for k, v in setting.items() if k != "checkpoint"})
            except TypeError:  # the family has no such option
                continue
            queue = context.Queue()
            process = context.Process(
                target=_measure, args=(name, args.batch, args.size, setting, queue)
            )
            process.start()
            saved, peak = queue.get()
            process.join()
            table.add_row(name, label, f"{saved / 2**20:,.0f} MiB", f"{peak / 2**20:,.0f} MiB")
    Console().print(table)


if __name__ == "__main__":
    main()
