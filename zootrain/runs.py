"""Run directories: each run owns one for its whole life, and a resume continues in it.

A new single run gets `<outputs>/<run_name>/<time>/`, created exclusively: a second run of the
same `run_name` started in the same second gets `<time>_1/` (mkdir is atomic, also on NFS).
`ckpt_path` names the run to continue, which then writes into its own directory again, so
Lightning keeps the best checkpoint's score and path (it drops them when the directory changes):

- `ckpt_path=<run dir>`: that run, from its newest checkpoint (`find_resume`).
- `ckpt_path=<run dir>/checkpoints/<name>.ckpt` (or `<run dir>/hpc_ckpt_<n>.ckpt`): that run, from
  that file. A `.ckpt` outside any run directory starts a new run from its state.
- `ckpt_path=last`: this run directory's own newest checkpoint (a sweep resumed in place), else
  the newest run of this `run_name` (single runs and sweep jobs; newest by its `config.yaml`,
  written when a run starts or resumes). That run must have a checkpoint and be unfinished: it
  is never skipped for an older one.

This module imports only the standard library and omegaconf (Hydra resolves `hydra.run.dir`
through `run_dir` before torch is loaded).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

from .errors import CheckpointError, ConfigError

TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
CONFIG = "config.yaml"  # written by train() into every run directory when it starts or resumes


def new_run_dir(outputs: str | os.PathLike, run_name: str) -> Path:
    """Create and return `<outputs>/<run_name>/<time>[_<n>]/`, a directory no other run has."""
    parent = Path(outputs) / run_name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime(TIME_FORMAT)
    for n in range(10_000):
        path = parent / (stamp if n == 0 else f"{stamp}_{n}")
        try:
            path.mkdir()  # exclusive: fails if another process made it first
        except FileExistsError:
            continue
        return path.resolve()
    raise ConfigError(f"could not create a new run directory under {parent}")


def run_dir(outputs: str, run_name: str, ckpt_path: Any) -> str:
    """`hydra.run.dir`: the run that `ckpt_path` continues, else a new directory of its own.

    Registered as the `run_dir` resolver (Hydra resolves it once per single run; DDP ranks > 0
    get the directory on their command line, SLURM jobs in their pickled config). A `ckpt_path`
    that names nothing resumable gets a new directory, where `train()` says what is wrong.
    """
    if ckpt_path not in (None, "", "None"):
        path = Path(str(ckpt_path))
        found = path.resolve() if path.is_dir() else _run_of_file(path)
        if str(ckpt_path) == "last":
            try:
                found = _last_run(Path(outputs), None, run_name)
            except CheckpointError:
                found = None  # train() says why
        if found is not None:
            return str(found)
    return str(new_run_dir(outputs, run_name))


class Resume(NamedTuple):
    """Where a run writes and the checkpoint it goes on from (None: from scratch)."""

    run_dir: Path
    checkpoint: Path | None


def resolve_resume(cfg: Any) -> Resume:
    """The run directory and checkpoint for `cfg.ckpt_path` (see the module docstring)."""
    from .checkpoints import find_resume

    output_dir = Path(cfg.paths.output_dir)
    if cfg.ckpt_path is None:
        # A requeued SLURM job (signalled before its time limit, or preempted) is the same Hydra
        # job in the same run directory: it goes on from the newest checkpoint there.
        requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
        return Resume(output_dir, find_resume(output_dir) if requeued else None)
    ckpt_path = str(cfg.ckpt_path)
    if ckpt_path == "last":
        own = find_resume(output_dir)
        if own is not None:
            return Resume(output_dir, own)
        run = _last_run(Path(cfg.paths.outputs), Path(cfg.paths.multirun), cfg.run_name)
        return Resume(run, find_resume(run))
    path = Path(ckpt_path)
    if path.is_dir():
        checkpoint = find_resume(path)
        if checkpoint is None:
            raise CheckpointError(
                f"ckpt_path={ckpt_path}: the directory holds no checkpoints/last.ckpt "
                "(nor hpc_ckpt_<n>.ckpt); pass a run directory or a .ckpt file"
            )
        return Resume(path.resolve(), checkpoint)
    return Resume(_run_of_file(path) or output_dir, path)


def _last_run(outputs: Path, multirun: Path | None, run_name: str) -> Path:
    """The newest run of `run_name`, which must have a checkpoint (never an older one instead)."""
    runs = runs_of(outputs, multirun, run_name)
    if not runs:
        where = f"{outputs / run_name}/"
        if multirun is not None:
            where += f" or {multirun}/<time>/<n>-{run_name}/"
        raise CheckpointError(
            f"ckpt_path=last: there is no run of {run_name!r} to resume under {where}; train "
            "once without ckpt_path, or pass a checkpoint file or run directory"
        )
    newest = runs[-1]
    if not _has_checkpoint(newest):
        raise CheckpointError(
            f"ckpt_path=last: the newest run of {run_name!r}, {newest}, has no checkpoint yet "
            "(it stopped before its first epoch ended): nothing to resume. Start it again "
            "without ckpt_path, or pass ckpt_path=<run dir> of another run"
        )
    return newest


def _has_checkpoint(run: Path) -> bool:
    return (run / "checkpoints" / "last.ckpt").is_file() or any(run.glob("hpc_ckpt_*.ckpt"))


def _run_of_file(path: Path) -> Path | None:
    """The run directory a checkpoint file belongs to, or None for a loose file."""
    path = path.resolve()
    for run in (path.parent.parent, path.parent):  # checkpoints/<name>.ckpt, hpc_ckpt_<n>.ckpt
        if (run / CONFIG).is_file():
            return run
    return None


def runs_of(outputs: Path, multirun: Path | None, run_name: str) -> list[Path]:
    """The run directories of `run_name`, oldest first (by when each last started)."""
    job = re.compile(rf"\d+-{re.escape(run_name)}")
    candidates = [*(Path(outputs) / run_name).glob("*/")]
    if multirun is not None:
        candidates += [d for d in Path(multirun).glob("*/*/") if job.fullmatch(d.name)]
    runs = [d.resolve() for d in candidates if (d / CONFIG).is_file()]
    return sorted(runs, key=lambda d: (d / CONFIG).stat().st_mtime_ns)


def check_unfinished(checkpoint: dict[str, Any], resume: Resume, max_epochs: int) -> None:
    """Refuse to resume a run that has nothing left to do (it would only rewrite its exports)."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    # "processed": the epochs whose training and validation ran (a checkpoint saved at an
    # epoch's end counts it; "completed" is counted only after the save)
    done = loops.get("epoch_progress", {}).get("current", {}).get("processed")
    if done is None:
        done = checkpoint.get("epoch", -1) + 1
    stopped = [
        state
        for key, state in checkpoint.get("callbacks", {}).items()
        if key.startswith("EarlyStopping")
        and state.get("wait_count", 0) >= state.get("patience", 1)
    ]
    if stopped:
        why = f"early stopping ended it after epoch {done}"
    elif max_epochs is not None and max_epochs >= 0 and done >= max_epochs:
        why = f"{done} of trainer.max_epochs={max_epochs} epochs are done"
    else:
        return
    raise CheckpointError(
        f"the run {resume.run_dir} is finished ({why}): nothing to resume from "
        f"{resume.checkpoint.name}. Evaluate it with `eval.py ckpt_path={resume.run_dir}`; to "
        "train on, start a new run from its weights (backbone.pretrained=<run dir>/checkpoints/"
        "backbone.safetensors) or, with scheduler=none, resume with a larger trainer.max_epochs"
    )


# What a resumed run takes from its checkpoint, so its config may not say otherwise: the
# optimiser's and the schedule's state (Lightning restores them over what the config builds).
FIXED_ON_RESUME = ("optim", "scheduler", "backbone_lr_mult")


def check_unchanged(stored: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse a resume whose config changes what the checkpoint fixes (see `FIXED_ON_RESUME`).

    `trainer.max_epochs` may grow or shrink with `scheduler=none` (the loop reads it afresh); a
    schedule's length is fixed when the run starts, so under one it may not change. Compares
    plain values only: nothing is built from the stored config.
    """
    keys = [*FIXED_ON_RESUME]
    if (stored.get("scheduler") or {}).get("name", "none") != "none":
        keys.append("trainer.max_epochs")
    old, new = _flat(stored), _flat(current)
    changed = [
        key
        for key in sorted(old)  # an option newer than the checkpoint is no change
        if any(key == k or key.startswith(f"{k}.") for k in keys) and old.get(key) != new.get(key)
    ]
    if not changed:
        return
    first = changed[0]
    more = f" (and {len(changed) - 1} more: {', '.join(changed[1:])})" if len(changed) > 1 else ""
    raise ConfigError(
        f"{first}={new.get(first)} differs from {old.get(first)}, what the run resumed from "
        f"{checkpoint} was started with{more}: the optimizer, the scheduler, backbone_lr_mult "
        "and (under a scheduler) trainer.max_epochs cannot change on resume. Resume with the "
        "run's values (its config.yaml), or start a new run from its weights"
    )


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: leaf value}."""
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}
