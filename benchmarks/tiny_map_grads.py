"""Training steps of `make train`'s model with and without `tiny_map_conv_grads`, side by side.

Composes configs/train.yaml (overrides from the command line), builds the model twice from one
seed (the option on, and off), and runs the same training batches through both: rounds of
`--steps` steps of one variant, then of the other, the order reversed every round. Prints the
median step time of each and the ratio. Data loading is outside the timed steps, so the ratio
is an upper bound of what it changes for a whole `python train.py` run.

    python benchmarks/tiny_map_grads.py --rounds 8 --steps 10 [--threads 1 --clock cpu] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from training.build import build_datamodule, build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (torch's)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time, which other processes' load does not inflate "
        "(with --threads 1 it is the step's compute time)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. backbone=mobilenetv3")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    batches = [next(loader) for _ in range(args.steps)]
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]

    variants = {}
    for enabled in (False, True):
        cfg.tiny_map_conv_grads = enabled
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, datamodule.num_classes).to(memory_format=torch.channels_last)
        optimizer = instantiate(cfg.optim)(model.parameters())
        variants["tiny_map_conv_grads=" + str(enabled).lower()] = (model.train(), optimizer)
    first, second = variants.values()
    assert all(  # one seed: the two variants start from the same weights
        torch.equal(a, b)
        for a, b in zip(
            first[0].state_dict().values(), second[0].state_dict().values(), strict=True
        )
    )

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x, y) -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in order:
            model, optimizer = variants[name]
            for x, y in batches:
                start = clock()
                step(model, optimizer, x, y)
                if round_:
                    times[name].append(clock() - start)
    print(
        f"{cfg.backbone.name}, {cfg.data.image_size} px, batch {cfg.data.batch_size}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, {args.rounds} rounds x "
        f"{args.steps} steps each"
    )
    # the fastest decile too: on a loaded machine it is the closest to an unloaded step time
    stats = {
        name: (statistics.median(t) * 1e3, statistics.quantiles(t, n=10)[0] * 1e3)
        for name, t in times.items()
    }
    for name, (median, fast) in stats.items():
        print(
            f"{name:26s} median {median:7.1f} ms/step  10th percentile {fast:7.1f} ms  "
            f"total {sum(times[name]):6.1f} s"
        )
    off, on = stats.values()
    print(
        f"speedup with tiny_map_conv_grads: {off[0] / on[0]:.3f}x (medians), "
        f"{off[1] / on[1]:.3f}x (10th percentiles)"
    )


if __name__ == "__main__":
    main()
