"""Run state: the run directory and its file names, what to resume and whether it may, and
what a checkpoint's stored config may name.

A run owns one directory for its whole life, and a resume continues in it:

    <run dir>/config.yaml               the resolved run config (written when it starts or resumes)
             checkpoints/best.ckpt      the best by the task's metric; last.ckpt after every epoch
             checkpoints/backbone.safetensors   the best checkpoint's backbone (`create(pretrained=)`)
             hpc_ckpt_<n>.ckpt          Lightning's save on a SLURM requeue signal
             eval/<checkpoint>-<split>/ eval.py's pictures
             trackers.json              the run's MLflow / W&B run ids: a resume continues them

A new single run gets `<outputs>/<run_name>/<time>/`, created exclusively: a second run of the
same `run_name` started in the same second gets `<time>_1/` (mkdir is atomic, also on NFS).
`ckpt_path` names the run to continue, which then writes into its own directory again, so
Lightning keeps the best checkpoint's score and path (it drops them when the directory changes):

- `ckpt_path=<run dir>`: that run, from its newest checkpoint (`find_resume`).
- `ckpt_path=<run dir>/checkpoints/<name>.ckpt` (or `<run dir>/hpc_ckpt_<n>.ckpt`): that run, from
  that file. A `.ckpt` outside any run directory starts a new run from its state.
- `ckpt_path=last`: this run directory's own newest checkpoint (a sweep resumed in place), else
  the newest run of this `run_name` (single runs and sweep jobs; newest by its `config.yaml`).
  That run must have a checkpoint and be unfinished: it is never skipped for an older one.

A checkpoint may come from anyone: the run config stored in it (which eval.py rebuilds model and
data from) names nothing off `ALLOWED_TARGETS` and holds no interpolation (`trusted_config`).

This module imports only the standard library, omegaconf and hydra (Hydra resolves
`hydra.run.dir` through `run_dir` before torch is loaded).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from hydra.utils import get_object

from .errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
# The files of a run directory (see the module docstring); nothing else spells these names.
CONFIG = "config.yaml"  # written into every run directory when it starts or resumes
CHECKPOINTS = "checkpoints"
BEST, LAST = "best", "last"  # checkpoints/<name>.ckpt
REQUEUE_CHECKPOINTS = "hpc_ckpt_*.ckpt"  # Lightning's name for the save on a requeue signal
BACKBONE = "backbone.safetensors"  # in checkpoints/, beside the checkpoint it came from
METRICS_PLOT = "metrics.png"
EVAL = "eval"
LOCK = ".lock"  # held (flock) by the one live process of the run
RECORD = ".hydra"  # Hydra's record of how the run was started; later ones beside it
TRACKERS = "trackers.json"  # the ids of the run's MLflow / W&B runs (zootrain.trackers)
SQLITE = "sqlite:///"  # a SQLAlchemy URL of a SQLite file: the path follows


def new_run_dir(outputs: str | os.PathLike, run_name: str) -> Path:
    """Create and return `<outputs>/<run_name>/<time>[_<n>]/`, a directory no other run has."""
    parent = Path(outputs) / run_name
    stamp = time.strftime(TIME_FORMAT)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(10_000):
            path = parent / (stamp if n == 0 else f"{stamp}_{n}")
            try:
                path.mkdir()  # exclusive: fails if another process made it first
            except FileExistsError:
                continue
            return path.resolve()
    except OSError as error:  # read-only, no permission, a file in the way
        raise ConfigError(
            f"cannot create a run directory under {parent} ({error.strerror}); set "
            "paths.outputs to a folder you can write"
        ) from None
    raise ConfigError(f"could not create a new run directory under {parent}")


def run_dir(outputs: str, run_name: str, ckpt_path: Any) -> str:
    """`hydra.run.dir`: the run that `ckpt_path` continues, else a new directory of its own.

    Registered as the `run_dir` resolver (Hydra resolves it once per single run; DDP ranks > 0
    get the directory on their command line, SLURM jobs in their pickled config). A `ckpt_path`
    that names nothing resumable gets a new directory, where `train()` says what is wrong.
    """
    check_run_name(run_name)  # before any directory is made from it
    if ckpt_path not in (None, "", "None"):
        path = Path(str(ckpt_path))
        found = path.resolve() if is_run(path) else _run_of_file(path)
        if str(ckpt_path) == "last":
            try:
                found = _last_run(Path(outputs), None, run_name)
            except CheckpointError:
                found = None  # train() says why
        if found is not None:
            return str(found)
    return str(new_run_dir(outputs, run_name))


def run_subdir(output_dir: str, kind: str) -> str:
    """`hydra.output_subdir`: `.hydra` for a run's first start; for a later process in the same
    directory (a resume, eval.py) `.hydra/<kind>-<n>`, so that the record of how the run was
    started is never overwritten. Reserved by an exclusive mkdir: two processes get two."""
    record = Path(output_dir) / RECORD
    if not (record / "config.yaml").is_file():
        return RECORD
    kind = "resume" if kind == "train" else kind  # a training job in an existing run resumes it
    for n in range(1, 10_000):
        try:
            (record / f"{kind}-{n}").mkdir(parents=True)
        except FileExistsError:
            continue
        return f"{RECORD}/{kind}-{n}"
    raise ConfigError(f"{record} holds 10,000 records of {kind}s; clear it out")


def run_log(output_dir: str, job_name: str) -> str:
    """The log file of a Hydra job (`<run dir>/<job name>.log`), after taking the run
    directory's lock for a training job: Hydra opens the log, then writes its `.hydra/` record,
    so this is the first moment a second process would write into a live run's directory."""
    if job_name == "train" and launch_rank() == 0:
        lock_run_dir(output_dir)
    return str(Path(output_dir) / f"{job_name}.log")


def sqlite_store(url: str) -> str:
    """A database URL with a SQLite file's path made absolute and its folder created (every
    job of a sweep, wherever it starts, finds the same file); other URLs, and SQLite in
    memory, as they are. The trackers' and the Optuna studies' stores."""
    if not url.startswith(SQLITE) or url == f"{SQLITE}:memory:":
        return url
    database = Path(url.removeprefix(SQLITE)).resolve()
    database.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE}{database}"


def launch_rank() -> int:
    """This process's global rank from the launcher's environment (0 when alone)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


_LOCKS: dict[Path, int] = {}  # the run directories this process holds, and the lock's fd


def lock_run_dir(run_dir: str | os.PathLike) -> None:
    """Take the run directory's exclusive lock for this process (a no-op if it holds it).

    An OS file lock (`flock`) on `<run dir>/.lock`: it dies with its process, so a run whose
    process was killed, or whose node was lost, is resumed without a stale marker in the way.
    A second process is refused in one line naming the holder (its pid, host and command, as
    written into the lock file)."""
    path = Path(run_dir).resolve()
    if path in _LOCKS:
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"the run directory {path} is in use by {holder}: one live process writes a run. "
            "Wait for it to end (a resume of it then goes on from its last checkpoint), or "
            "start a new run"
        ) from None
    except OSError as error:  # a file system without locks (Lustre without -o flock, NFS nolock)
        log.warning(
            "%s: the file system gives no locks (%s): nothing stops a second process from "
            "writing this run (docs/cluster.md says how to mount it)",
            path,
            error.strerror,
        )
    os.ftruncate(fd, 0)
    command = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} ({command})".encode())
    _LOCKS[path] = fd


def release_run_dir(run_dir: str | os.PathLike) -> None:
    """Give up the run directory's lock (the lock file stays: it is not a marker)."""
    fd = _LOCKS.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


@contextmanager
def run_dir_locked(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the run directory's lock in the block (rank 0 only: the other ranks of a DDP run
    write through rank 0), then release it. A lock this process holds already (train.py's,
    taken when Hydra opened the log) stays held: its taker releases it, after the sweep's
    record of the job is written."""
    if launch_rank() != 0 or Path(run_dir).resolve() in _LOCKS:
        yield
        return
    lock_run_dir(run_dir)
    try:
        yield
    finally:
        release_run_dir(run_dir)


def check_run_name(run_name: Any) -> None:
    """A run name is one folder under `paths.outputs`: no path separators, not `.` or `..`."""
    name = str(run_name)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(
            f"run_name={name!r} cannot work: it names one folder under paths.outputs (no '/', "
            "not '.' or '..'); to write elsewhere set paths.outputs"
        )


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a run directory (train.py wrote its config.yaml there)."""
    return (Path(path) / CONFIG).is_file()


class Resume(NamedTuple):
    """Where a run writes and the checkpoint it goes on from (None: from scratch)."""

    run_dir: Path
    checkpoint: Path | None


def resolve_resume(cfg: Any) -> Resume:
    """The run directory and checkpoint for `cfg.ckpt_path` (see the module docstring)."""
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
        if not is_run(path):
            raise CheckpointError(
                f"ckpt_path={ckpt_path} is a directory but not a run of train.py (it has no "
                f"{CONFIG}); pass a run directory or a .ckpt file"
            )
        checkpoint = find_resume(path)
        if checkpoint is None:
            raise CheckpointError(
                f"ckpt_path={ckpt_path}: the directory holds no {CHECKPOINTS}/{LAST}.ckpt "
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
    if find_resume(newest) is None:
        raise CheckpointError(
            f"ckpt_path=last: the newest run of {run_name!r}, {newest}, has no checkpoint yet "
            "(it stopped before its first epoch ended): nothing to resume. Start it again "
            "without ckpt_path, or pass ckpt_path=<run dir> of another run"
        )
    return newest


def _run_of_file(path: Path) -> Path | None:
    """The run directory a checkpoint file belongs to, or None for a loose file."""
    path = path.resolve()
    for run in (path.parent.parent, path.parent):  # checkpoints/<name>.ckpt, hpc_ckpt_<n>.ckpt
        if is_run(run):
            return run
    return None


def runs_of(outputs: Path, multirun: Path | None, run_name: str) -> list[Path]:
    """The run directories of `run_name`, oldest first (by when each last started)."""
    job = re.compile(rf"\d+-{re.escape(run_name)}")
    candidates = [*(Path(outputs) / run_name).glob("*/")]
    if multirun is not None:
        candidates += [d for d in Path(multirun).glob("*/*/") if job.fullmatch(d.name)]
    runs = [d.resolve() for d in candidates if is_run(d)]
    return sorted(runs, key=lambda d: (d / CONFIG).stat().st_mtime_ns)


def checkpoint_dir(run: str | os.PathLike) -> Path:
    """`<run>/checkpoints/`, where ModelCheckpoint writes best.ckpt and last.ckpt."""
    return Path(run) / CHECKPOINTS


def find_best(run_dir: str | os.PathLike) -> Path:
    """The checkpoint `eval.py` scores for a run directory: `checkpoints/best.ckpt`."""
    best = checkpoint_dir(run_dir) / f"{BEST}.ckpt"
    if not best.is_file():
        found = sorted(p.name for p in checkpoint_dir(run_dir).glob("*.ckpt"))
        raise CheckpointError(
            f"ckpt_path={run_dir} is a directory without {CHECKPOINTS}/{BEST}.ckpt (it holds "
            f"{', '.join(found) or 'no checkpoint'}); pass a run directory of train.py or a "
            ".ckpt file"
        )
    return best


def find_resume(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint a run directory can go on from: `checkpoints/last.ckpt` (every
    epoch) or `hpc_ckpt_<n>.ckpt` (Lightning's save on a SLURM requeue signal); None if neither."""
    run_dir = Path(run_dir)
    candidates = [checkpoint_dir(run_dir) / f"{LAST}.ckpt", *run_dir.glob(REQUEUE_CHECKPOINTS)]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def eval_pictures_dir(ckpt_path: str | os.PathLike, split: str) -> Path:
    """Where eval.py puts a checkpoint's pictures: `<run dir>/eval/<checkpoint>-<split>/` for a
    checkpoint in `<run dir>/checkpoints/`, else `eval/<checkpoint>-<split>/` beside the file."""
    path = Path(ckpt_path)
    run = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    return run / EVAL / f"{path.stem}-{split}"


# ---------------------------------------------------------------------- may this run resume


def check_resume(
    checkpoint: dict[str, Any], resume: Resume, current: dict[str, Any], module: Any, by_hand: bool
) -> None:
    """Refuse a resume from `checkpoint` (read from `resume.checkpoint`) of another model
    (`module`'s), one whose config (`current`, plain) changes what the checkpoint fixes, or, when
    asked for `by_hand` (a requeued SLURM job just goes on), of a finished run."""
    check_fits(checkpoint, resume.checkpoint, module)
    check_unchanged(checkpoint["hyper_parameters"]["config"], current, resume.checkpoint)
    if by_hand:
        check_unfinished(checkpoint, resume, current["trainer"].get("max_epochs"))


def check_fits(checkpoint: dict[str, Any], path: str | os.PathLike, module: Any) -> None:
    """Refuse to resume `module`'s run from a checkpoint of another model, naming both."""
    stored, hparams = checkpoint["hyper_parameters"]["config"], checkpoint["hyper_parameters"]
    ours = getattr(module, "hparams", {}).get("config", {})

    def describe(config: dict[str, Any], num_classes: Any) -> str:
        backbone = config.get("backbone", {}).get("name", "?")
        head = config.get("head", {}).get("name", "?")
        return f"{backbone} + {head}, {num_classes} classes"

    theirs = describe(stored, hparams.get("num_classes"))
    mine = describe(ours, getattr(module, "num_classes", "?"))
    expected = {k: v.shape for k, v in module.state_dict().items()}
    got = {k: v.shape for k, v in checkpoint["state_dict"].items()}
    if theirs == mine and expected == got:
        return
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and got[k] != expected[k]]
    counts = ", ".join(
        f"{len(keys)} {label} (e.g. {keys[0]})"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", wrong),
        )
        if keys
    )
    if not counts:
        return  # another name for the same architecture: its weights fit
    raise CheckpointError(
        f"ckpt_path={path} is a checkpoint of {theirs}; this run builds {mine}, which its "
        f"weights do not fit ({counts}). Resume with the config it was trained with, or "
        f"start a new run (its backbone weights: backbone.pretrained=<its run dir>/{CHECKPOINTS}/"
        f"{BACKBONE})"
    )


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
        f"train on, start a new run from its weights (backbone.pretrained=<run dir>/{CHECKPOINTS}/"
        f"{BACKBONE}) or, with scheduler=none, resume with a larger trainer.max_epochs"
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


# ---------------------------------------------------------------------- what a checkpoint may name

# The `_target_`s that moved since older checkpoints stored their run config, and where each
# lives now. `load_checkpoint` applies this table to the stored config, the one place a config
# comes back from a file (`eval.py` rebuilds model and data from it); exact paths only.
MOVED_TARGETS: dict[str, str] = {
    # issue 17: training/data/ became a package, one classifier builder in heads/
    "training.build.classifier": "heads.build_classifier",
    "training.data.ShapesDataModule": "zootrain.data.shapes.ShapesDataModule",
    "training.datasets.ImageFolderDataModule": "zootrain.data.imagefolder.ImageFolderDataModule",
    "training.datasets.CIFAR10DataModule": "zootrain.data.cifar.CIFAR10DataModule",
    "training.datasets.CIFAR100DataModule": "zootrain.data.cifar.CIFAR100DataModule",
    "training.datasets.OxfordPetDataModule": "zootrain.data.pet.OxfordPetDataModule",
    "training.datasets.VOCSegmentationDataModule": "zootrain.data.voc.VOCSegmentationDataModule",
    "training.datasets.COCODetectionDataModule": "zootrain.data.coco.COCODetectionDataModule",
}
# Packages renamed since: a stored target under the old prefix (not in the table above) is
# read under the new one. Issue 30: `training` became `zootrain` (a user's own `training/`
# package no longer shadows ours).
MOVED_PACKAGES: dict[str, str] = {"training.": "zootrain."}

# What a stored run config may name as a `_target_`: nothing else is imported or built from a
# checkpoint. An entry ending in "." admits the objects defined in that package (checked where
# the named object really lives, so `heads.torch.load` is refused); any other entry, exactly
# that name. The configs in configs/ name only these.
ALLOWED_TARGETS: tuple[str, ...] = (
    "backbones.create",
    "heads.",
    "zootrain.data.",
    "zootrain.callbacks.",
    "zootrain.loggers.CSVLogger",
    "zootrain.trackers.MLFlowLogger",
    "zootrain.trackers.WandbLogger",
    "torch.optim.",
    "lightning.Trainer",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.strategies.",
    "lightning.pytorch.profilers.SimpleProfiler",  # debug=profiler
)


def trusted_config(config: Any, path: str | os.PathLike, also_allowed: Any = ()) -> Any:
    """The run config stored in the checkpoint at `path`, with moved targets updated, or a
    `CheckpointError` if it names a `_target_` off `ALLOWED_TARGETS` (plus the exact names in
    `also_allowed`) or holds a `${...}` interpolation. Nothing is built from it here."""
    config = _current_targets(config)
    problems = [
        (where, what)
        for where, what, target in _untrusted(config, "")
        if target not in also_allowed
    ]
    if problems:
        where, what = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{path}: its stored run config {what} at {where}{more}. Nothing was built from "
            "it: train.py stores only the project's own targets, resolved, so this file was "
            "written or edited elsewhere. A checkpoint may name only these targets: "
            f"{', '.join(ALLOWED_TARGETS)}"
        )
    return config


def moved_target(target: str) -> str:
    """Where the `_target_` an older version stored lives now (itself if it did not move)."""
    if target in MOVED_TARGETS:
        return MOVED_TARGETS[target]
    for old, new in MOVED_PACKAGES.items():
        if target.startswith(old):
            return new + target.removeprefix(old)
    return target


def _current_targets(node: Any) -> Any:
    """The stored config `node` with every moved `_target_` replaced by where it lives now."""
    if isinstance(node, dict):
        return {
            key: moved_target(value)
            if key == "_target_" and isinstance(value, str)
            else _current_targets(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_current_targets(item) for item in node]
    return node


def config_targets(node: Any) -> set[str]:
    """Every `_target_` string in a config (plain containers)."""
    if isinstance(node, dict):
        own = {node["_target_"]} if isinstance(node.get("_target_"), str) else set()
        return own.union(*(config_targets(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(config_targets(item) for item in node))
    return set()


def _untrusted(node: Any, where: str) -> Iterator[tuple[str, str, str | None]]:
    """(key path, what is wrong, the target) for every `_target_` not allowed and every
    interpolation (whose target is None)."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                problem = _target_problem(value)
                if problem:
                    yield path, problem, value
            else:
                yield from _untrusted(value, path)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _untrusted(item, f"{where}[{index}]")
    elif isinstance(node, str) and "${" in node:
        # stored resolved: an interpolation could only read the environment or call resolvers
        yield where, f"holds an interpolation ({node!r}), which is not resolved", None


def _target_problem(target: Any) -> str | None:
    """Why `target` may not be built from a checkpoint, or None when it may."""
    if not isinstance(target, str):
        return f"names a target that is not a dotted name ({target!r})"
    refusal = f"names {target!r}, which is not on the allow-list"
    # A private or dunder step (`__globals__`, `_load`) leads anywhere: never followed.
    if any(not part or part.startswith("_") for part in target.split(".")):
        return refusal
    for allowed in ALLOWED_TARGETS:
        if target == allowed:
            return None
        if allowed.endswith(".") and target.startswith(allowed):
            # Import only within the allowed package, then check where the object is defined:
            # a module's imports (`heads.torch`) would otherwise lead out of it.
            try:
                found = get_object(target)
            except Exception:  # any import or lookup failure: there is nothing to build
                return f"names {target!r}, which does not exist in this version"
            home = getattr(found, "__module__", None) or ""
            if not callable(found) or not (home.startswith(allowed) or home == allowed[:-1]):
                return f"{refusal} (it is {home or 'no module'}'s, not {allowed[:-1]}'s)"
            return None
    return refusal
