"""Host syncs: the counter sees every kind, and a training step stays within its budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.syncs import HostSyncs, StepSyncs
from tests.test_training import TINY, config
from zootrain.run import train

T = torch.tensor([0.5, 1.5, 1.5])

SYNCS = {
    "item": lambda: T.sum().item(),
    "float": lambda: float(T.sum()),
    "int": lambda: int(T.sum()),
    "if": lambda: 1 if T.sum() > 0 else 0,
    "format": lambda: f"{T.sum():.3f}",
    "index": lambda: [0, 1, 2, 3][T.sum().long()],
    "tolist": lambda: T.tolist(),
    "numpy": lambda: T.numpy(),
    "cpu": lambda: T.cpu(),
    "nonzero": lambda: T.nonzero(),
    "boolean mask": lambda: T[T > 1],
    "equal": lambda: torch.equal(T, T),
    "unique": lambda: T.unique(),
}


@pytest.mark.parametrize("sync", SYNCS.values(), ids=SYNCS.keys())
def test_every_kind_of_host_sync_is_counted_once(sync) -> None:
    with HostSyncs() as syncs:
        sync()
    assert syncs.counts == {"outside fit": 1}
    ((_, _, site),) = syncs.sites
    assert site.startswith(f"{__file__}:")  # the line that asked, not torch's


def test_plain_device_work_is_not_a_sync() -> None:
    with HostSyncs() as syncs:
        x = T * 2
        torch.where(torch.isfinite(x.sum()), x.sum(), 0.0)
        T[torch.tensor([0, 2])]  # integer indices: no data-dependent size
    assert not syncs.counts


class Seeded(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(()) * int(torch.randint(8, ()))  # a CPU-side random choice


def test_syncs_while_loading_data_are_counted_apart() -> None:
    with HostSyncs() as syncs:
        for batch in DataLoader(Seeded(), batch_size=2):
            batch.sum().item()
    assert syncs.counts["data loading"] >= 4  # each sample's randint (and the sampler's seed)
    assert syncs.counts["outside fit"] == 2


def _fit_counting(tmp_path: Path, *overrides: str) -> tuple[HostSyncs, StepSyncs, dict]:
    """`train(cfg)` with the progress bar, the plot and the CSV logger on, syncs counted."""
    cfg = config(
        tmp_path,
        *[o for o in TINY if not o.startswith(("callbacks=", "trainer.enable_progress_bar"))],
        "callbacks=default",
        "trainer.enable_progress_bar=true",
        "trainer.log_every_n_steps=4",
        "data.batch_size=8",
        "data.num_train=96",  # 12 steps per epoch
        "data.num_val=16",
        "trainer.max_epochs=2",
        *overrides,
    )
    syncs = HostSyncs()
    phases = StepSyncs(syncs)
    with syncs:
        result = train(cfg, extra_callbacks=[phases])
    return syncs, phases, result


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [(), ("head=fpn", "backbone=mobilenetv3")],
    ids=["classification", "segmentation"],
)
def test_training_steps_sync_at_most_once_per_logging_interval(
    overrides: tuple[str, ...], tmp_path: Path
) -> None:
    syncs, phases, result = _fit_counting(tmp_path, *overrides)
    assert phases.steps == 24
    # One read every log_every_n_steps = 4 steps: the non-finite check with the step loss.
    assert syncs.counts["train step"] <= phases.steps // 4, syncs.where("train step")
    assert syncs.counts["train step"] == 6  # the check runs (the budget test cannot pass idle)
    # ... and the values it reads reach the CSV log, every 4 steps, as Lightning logged them.
    rows = (Path(result.output_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [
        int(row.split(",")[header.index("step")])
        for row in rows[1:]
        if row.split(",")[header.index("train/loss_step")]
    ]
    assert steps == [3, 7, 11, 15, 19, 23]
