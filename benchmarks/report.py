"""Writing results into ``docs/benchmarks.md``: each benchmark owns one ``## `` section."""

from __future__ import annotations

import json
from pathlib import Path

DOC = Path("docs/benchmarks.md")
HEADER = "# Benchmarks\n\nEach figure is a ratio measured within one run (the machine is shared and noisy).\n"


def replace_section(heading: str, section: str, doc: Path = DOC) -> None:
    """Replace the section starting with ``\\n## {heading}`` (or append it); others stay as they are.

    ``section`` is the whole section text, starting with ``"\\n## " + heading``.
    """
    text = doc.read_text() if doc.exists() else HEADER
    marker = f"\n## {heading}"
    start = text.find(marker)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def save_result(out: str | Path, name: str, result: dict) -> Path:
    """Write ``result`` as ``<out>/<name>`` (pretty JSON); returns the path."""
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
