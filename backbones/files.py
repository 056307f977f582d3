"""Weights files: reading them safely, writing them atomically, safetensors in and out.

Reading never unpickles code: `.pth`/`.pt` files go through `torch.load(weights_only=True)`,
`.safetensors` through safetensors. Writing goes to a temp file renamed into place, so a
crash never leaves half a file under the final name.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]

FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Containers that training scripts wrap state dicts in, and prefixes wrappers add to keys.
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsError(RuntimeError):
    """Pretrained weights could not be read, converted or loaded; the message says why."""


# ------------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike, allow_non_finite: bool = False) -> StateDict:
    """Read a `.pth`/`.pt` (tensors only, `weights_only=True`) or `.safetensors` file.

    A file with NaN or infinite values (a diverged run, a damaged copy) is refused, naming the
    tensors, unless `allow_non_finite`: to load one anyway, pass the state dict it returns,
    `create(name, pretrained=read_state_dict(path, allow_non_finite=True))`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no weights file at {str(path)!r}. `pretrained` takes 'torchvision', 'timm', "
            f"or the path of an existing {'/'.join(FILE_SUFFIXES)} file."
        )
    if path.suffix not in FILE_SUFFIXES:
        raise WeightsError(
            f"{path}: unknown weights format {path.suffix!r}; expected one of {FILE_SUFFIXES}"
        )
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                state_dict = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except SafetensorError as e:
            raise WeightsError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                "corrupt: download or convert it again."
            ) from None
    else:
        state_dict = unwrap_state_dict(_torch_load(path), origin=str(path))
    if not allow_non_finite:
        _check_finite(state_dict, path)
    return state_dict


def _torch_load(path: Path) -> object:
    """`torch.load(weights_only=True)`, with one message per way a file can fail it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for files that are not its own
        code = _pickled_code(path)
        if code:
            raise WeightsError(
                f"{path} holds pickled code, not loaded: it names {name_list(code)}, which "
                "loading would import and run, and we never do. If you trust the file, re-save "
                "its weights: `torch.save(torch.load(path, weights_only=False).state_dict(), "
                "'clean.pth')` (or save them as .safetensors) and pass the new file."
            ) from None
        if not zipfile.is_zipfile(path) and starts_a_pickle(path):
            raise WeightsError(
                f"{path} is a pickle (pickle.dump, or torch.save's legacy format) that "
                "torch.load(weights_only=True) refused: it is not read, since unpickling can run "
                "any code. If you trust the file, re-save its tensors with torch.save (or as "
                ".safetensors) and pass the new file."
            ) from None
        # torch's own first line is about its weights_only default, not about this file
        why = "not a torch.save archive" if not zipfile.is_zipfile(path) else first_line(e)
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({why}); it may be truncated or "
            "corrupt, or not a weights file: download or save it again."
        ) from None


def starts_a_pickle(path: str | os.PathLike) -> bool:
    """Whether the file begins as a pickle does (pickle.dump, torch.save's legacy format)."""
    with open(path, "rb") as file:
        return file.read(1) == b"\x80"  # a pickle's protocol opcode


def _pickled_code(path: Path) -> list[str]:
    """The functions and classes outside torch's tensor types that the file's pickle names."""
    try:  # reads the pickle's opcodes; executes nothing
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch.save zip archive: no pickle to look into
        return []


def _check_finite(state_dict: StateDict, path: Path) -> None:
    bad = [
        key
        for key, value in state_dict.items()
        if value.is_floating_point() or value.is_complex()
        if not torch.isfinite(value).all()
    ]
    if bad:
        raise WeightsError(
            f"{path} holds NaN or infinite values in {len(bad)} tensor(s): {name_list(bad)}. "
            "Nothing was loaded: the weights come from a diverged run or a damaged copy. To "
            "load them anyway: create(name, pretrained=read_state_dict(path, "
            "allow_non_finite=True)) (backbones.files.read_state_dict)."
        )


def unwrap_state_dict(obj: object, origin: str = "checkpoint") -> StateDict:
    """Find the state dict in a checkpoint (`{"state_dict": ...}`, `{"model": ...}`, DDP keys)."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{origin} holds no state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{origin} is not a state dict: {name_list(bad)} are not tensors")
    state_dict = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def check_file_metadata(name: str, path: Path) -> None:
    """Refuse a `.safetensors` file whose metadata names another backbone than `name`."""
    # Files written by fetch_weights (and training runs) say which backbone they hold: catch a
    # mix-up before the keys are compared.
    if path.suffix != ".safetensors" or not path.is_file():
        return
    try:
        with safe_open(path, framework="pt") as f:
            stored = (f.metadata() or {}).get("backbone")
    except SafetensorError:
        return  # read_state_dict reports the corrupt file
    if stored is not None and stored != name:
        raise WeightsError(f"{path} holds weights for {stored!r}, not {name!r}")


# ------------------------------------------------------------------------------- writing


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds.

    A crash or an exception never leaves half a file under the final name. The file gets the
    mode a plain `open` would (0666 less the umask), not mkstemp's private 0600. An `OSError`
    in the block (a full disk) names `path`, not the temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # after the block: some writers (safetensors) create the file anew
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    # Reading the umask means setting it: set it straight back (one process-wide call pair).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:
            # The Rust writer reports a failed write (a full disk) as "... (os error 28)"
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1]))) from e
    return path


# ------------------------------------------------------------------------------ messages


def name_list(keys: list[str], limit: int = 6) -> str:
    """The first `limit` of `keys`, comma-separated, and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`, for an error quoted inside one of ours."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
