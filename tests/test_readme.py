"""README.md as written: its Python snippets run, its train.py / eval.py commands compose with
Hydra, its `python -m backbones` commands run or are covered by a named test, and every
relative link in README.md and docs/*.md points to a file (and heading) that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from backbones.__main__ import main as backbones_main
from zootrain.checks import check_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# `python -m backbones <cmd>` lines too slow or too heavy to run here, and the test that runs
# the same command through the same entry point.
COVERED = {
    "bench": "tests/test_bench.py::test_bench_command_writes_results",
    "export": "tests/test_export.py::test_export_command",
    "fetch-weights": "tests/test_weights.py::test_fetch_weights_cli",
}
RUN_HERE = {"list", "summary", "demo"}
# `python train.py --help` prints the config groups and stops: tests/test_cli.py runs it.
HELP_COVERED = "tests/test_cli.py::test_help_and_completion_import_no_torch"


def blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(first line number, body) of every fenced block of `language` in `text`."""
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == language
    ]


def commands(program: str) -> list[list[str]]:
    """The arguments after `python <program>` on every line of README's bash blocks."""
    prefix = ["python", *program.split()]
    lines = [line for _, body in blocks(README.read_text(), "bash") for line in body.splitlines()]
    words = [shlex.split(line, comments=True) for line in lines]
    return [w[len(prefix) :] for w in words if w[: len(prefix)] == prefix]


def test_python_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block, in order, in one namespace, in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    snippets = blocks(README.read_text(), "python")
    assert len(snippets) >= 5, "README.md lost its Python snippets"
    torch.manual_seed(0)
    for line, body in snippets:
        try:
            exec(compile(body, f"README.md:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"the snippet at README.md line {line} fails: {error!r}")


def hydra_runs(args: list[str]) -> list[list[str]]:
    """One override list per composition that covers every value of every sweep in `args`.

    `-m` is dropped; a sweep `a=x,y,z` gives its k-th value to the k-th composition."""
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line] for o in parsed
    ]
    values = [
        [f"{o.get_key_element()}={v}" if o.is_sweep_override() else v for v in c]
        for o, c in zip(parsed, choices, strict=True)
    ]
    return [
        [v[min(k, len(v) - 1)] for v in values] for k in range(max(map(len, values), default=1))
    ]


@pytest.mark.parametrize("program", ["train.py", "eval.py"])
def test_train_and_eval_commands_compose(program: str) -> None:
    """Every `python train.py ...` / `python eval.py ...` line composes with Hydra (hydra.*
    overrides and launchers included) and passes train.py's start-up value checks."""
    lines = commands(program)
    assert lines, f"README.md shows no `python {program}` command"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for args in lines:
            if "--help" in args:
                assert args == ["--help"], args
                continue  # HELP_COVERED
            for overrides in hydra_runs(args):
                try:
                    cfg = compose(
                        program.removesuffix(".py"), overrides=overrides, return_hydra_config=True
                    )
                    if program == "train.py":
                        with open_dict(cfg):  # Hydra's run sets it (${hydra:runtime.output_dir})
                            cfg.paths.output_dir = "outputs/run"
                        check_config(cfg)
                except Exception as error:
                    pytest.fail(f"`python {program} {shlex.join(args)}` does not compose: {error}")


def test_backbones_commands_run_or_are_covered(capsys: pytest.CaptureFixture[str]) -> None:
    """Cheap `python -m backbones` lines run here as written; the others name their test."""
    lines = commands("-m backbones")
    assert lines, "README.md shows no `python -m backbones` command"
    for args in lines:
        if args[0] in RUN_HERE:
            assert backbones_main(args) == 0, shlex.join(args)
            assert capsys.readouterr().out.strip(), shlex.join(args)
            continue
        assert args[0] in COVERED, f"`python -m backbones {shlex.join(args)}`: run it or cover it"
    for test in (*COVERED.values(), HELP_COVERED):
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), f"{test} does not exist"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    """Every relative link points to an existing file and, with a #fragment, to a heading."""
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, fragment = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"
