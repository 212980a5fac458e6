"""The README and docs/ point at things that exist.

Checked in README.md and docs/*.md: every relative link names a file (and its ``#anchor`` a
heading of that file, slugged as GitHub does); every ``python -m X`` in a ```bash or ```python
block names an importable module; every ``lepton-ray X [Y]`` names a subcommand of
:func:`lepton_ray.cli.build_parser`; every ``pipelines/configs/*.yaml`` mentioned exists; every
``from lepton_ray... import a, b`` in a ```python block imports (no Ray starts for that). The
README's layout tree names every top-level folder and every module of the package. The checkers
are tested on a small bad example first, so that a broken link cannot pass unnoticed.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
PYTHON_M = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
CLI = re.compile(r"(?<![\w/.-])lepton-ray((?:[ \t]+[a-z][\w-]*){1,2})")
CONFIG_PATH = re.compile(r"pipelines/configs/[\w.-]+\.yaml")
FROM_IMPORT = re.compile(
    r"^[ \t]*from[ \t]+(lepton_ray(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]+)", re.MULTILINE
)


# --- the checkers: pure functions over a page's text ---------------------------------------------
def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, markup and punctuation dropped, spaces
    to hyphens (``Elastic training, fault tolerance`` -> ``elastic-training-fault-tolerance``)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[`*_~]", "", text).strip().lower()  # keeps letters, digits, _, - and spaces
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", text)):
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def without_code(text: str) -> str:
    """The text outside fenced blocks and inline code spans (links and headings live there)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def code_blocks(text: str, *langs: str) -> list[str]:
    """The bodies of the fenced blocks in ``langs``, with backslash line continuations joined."""
    return [
        body.replace("\\\n", " ") for lang, body in FENCE.findall(text) if lang.lower() in langs
    ]


def link_problems(page: Path, text: str) -> list[str]:
    """Relative links whose file, or whose ``#anchor`` in that file, does not exist."""
    problems = []
    for target in LINK.findall(without_code(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{page.name}: link to {target}: no file {path}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            problems.append(f"{page.name}: link to {target}: no heading #{anchor} in {file.name}")
    return problems


def cli_commands() -> dict[str, set[str] | None]:
    """``lepton-ray``'s subcommands, each with its own subcommands (None when it has none)."""
    import argparse

    from lepton_ray.cli import build_parser

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:  # argparse keeps subparsers only here
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    out: dict[str, set[str] | None] = {}
    for name, sub in subcommands(build_parser()).items():
        out[name] = set(subcommands(sub)) or None
    return out


def command_problems(page: Path, text: str) -> list[str]:
    """``python -m`` modules, ``lepton-ray`` subcommands and config files that do not exist."""
    problems = []
    commands = cli_commands()
    for body in code_blocks(text, "bash", "sh", "shell", "python"):
        for module in PYTHON_M.findall(body):
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                problems.append(f"{page.name}: python -m {module}: no such module")
        for words in CLI.findall(body):
            name, *rest = words.split()
            if name not in commands:
                problems.append(f"{page.name}: lepton-ray {name}: no such subcommand")
            elif commands[name] is not None and rest and rest[0] not in commands[name]:
                problems.append(f"{page.name}: lepton-ray {name} {rest[0]}: no such subcommand")
    for config in CONFIG_PATH.findall(text):
        if not (ROOT / config).exists():
            problems.append(f"{page.name}: {config}: no such file")
    return problems


def import_problems(page: Path, text: str) -> list[str]:
    """``from lepton_ray... import names`` lines in python blocks that do not import."""
    problems = []
    for body in code_blocks(text, "python"):
        for module, names in FROM_IMPORT.findall(body):
            try:
                mod = importlib.import_module(module)
            except ImportError as exc:
                problems.append(f"{page.name}: from {module} import ...: {exc}")
                continue
            for name in re.sub(r"\s+as\s+\w+", "", names).strip("() \n").split(","):
                if (name := name.strip()) and not hasattr(mod, name):
                    problems.append(f"{page.name}: from {module} import {name}: no such name")
    return problems


# --- the checkers on a bad example ---------------------------------------------------------------
BAD_PAGE = """# Title

## Good section

A [good link](other.md#a-heading), a [good anchor](#good-section), [the web](https://example.com),
a [missing file](nowhere.md), a [missing anchor](other.md#no-such-heading),
[a local miss](#nope), and `[in code](ignored.md)`.

```bash
python -m lepton_ray.config.docs
python -m lepton_ray.no_such_module
lepton-ray data prepare mnist5k /tmp/x
lepton-ray data nosuch
lepton-ray frobnicate --now
python -m pipelines.train --config pipelines/configs/no_such.yaml
```

```python
from lepton_ray.config import TrainConfig, NoSuchName
from lepton_ray.no_such_module import x
```
"""


def test_the_checkers_find_broken_links_commands_and_imports(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A heading\n")
    page = tmp_path / "page.md"
    page.write_text(BAD_PAGE)

    assert sorted(link_problems(page, BAD_PAGE)) == [
        "page.md: link to #nope: no heading #nope in page.md",
        "page.md: link to nowhere.md: no file nowhere.md",
        "page.md: link to other.md#no-such-heading: no heading #no-such-heading in other.md",
    ]
    assert sorted(command_problems(page, BAD_PAGE)) == [
        "page.md: lepton-ray data nosuch: no such subcommand",
        "page.md: lepton-ray frobnicate: no such subcommand",
        "page.md: pipelines/configs/no_such.yaml: no such file",
        "page.md: python -m lepton_ray.no_such_module: no such module",
    ]
    problems = import_problems(page, BAD_PAGE)
    assert len(problems) == 2, problems
    assert "import NoSuchName: no such name" in problems[0]
    assert "lepton_ray.no_such_module" in problems[1]


def test_slug_matches_github():
    assert slug("Elastic training, fault tolerance, sample-exact resume") == (
        "elastic-training-fault-tolerance-sample-exact-resume"
    )
    assert slug("Self-healing jobs: `lepton-ray submit`") == "self-healing-jobs-lepton-ray-submit"
    assert slug("HAProxy ingress (opt-in)") == "haproxy-ingress-opt-in"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## `b` c\n") == {"a", "a-1", "b-c"}


# --- the real pages ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # pipelines/ and benchmarks/ are not installed


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_point_at_files_and_headings(page):
    assert link_problems(page, page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_name_modules_subcommands_and_configs_that_exist(page):
    assert command_problems(page, page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_imports_resolve(page):
    assert import_problems(page, page.read_text()) == []


def test_readme_keeps_what_ci_runs():
    """.ci/run runs `make test`; the README tells a newcomer the same command."""
    blocks = code_blocks((ROOT / "README.md").read_text(), "bash")
    assert any(re.search(r"^make test\b", b, re.MULTILINE) for b in blocks)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_make_test_and_demo_byte_compile_the_editable_tree_first():
    """pip leaves an editable install uncompiled: `make test` and `make demo` compile lepton_ray,
    the pipelines and the benchmarks before they run (the Makefile says why)."""
    for target, runs in (("test", "-m pytest"), ("demo", "-m pipelines.demo")):
        lines = subprocess.run(
            ["make", "-n", "-s", target], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.splitlines()
        compiles = [i for i, line in enumerate(lines) if "-m compileall" in line]
        assert compiles and all(
            d in lines[compiles[0]].split() for d in ("lepton_ray", "pipelines", "benchmarks")
        ), lines
        assert runs in lines[-1] and compiles[0] < len(lines) - 1, lines


def test_readme_layout_names_every_folder_and_module():
    text = (ROOT / "README.md").read_text()
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        f"lepton_ray/{p.relative_to(ROOT / 'lepton_ray')}"
        for p in sorted((ROOT / "lepton_ray").rglob("*.py"))
        if p.name != "__init__.py" and p.name not in layout
    ]
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if tracked.returncode == 0:
        folders = {f.split("/", 1)[0] for f in tracked.stdout.splitlines() if "/" in f}
        missing += [
            f"{d}/" for d in sorted(folders) if not d.startswith(".") and f"{d}/" not in layout
        ]
    assert missing == [], "README's layout tree does not name these"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
