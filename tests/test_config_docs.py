"""Pure tier: docs/configuration.md is what the config classes say (regenerate it when it is not)."""

from __future__ import annotations

import dataclasses

from lepton_ray.config import PipelineConfig
from lepton_ray.config.docs import DEFAULT_PATH, field_docs, main, render, sections


def test_the_committed_configuration_page_is_up_to_date():
    assert DEFAULT_PATH.read_text() == render(), (
        "docs/configuration.md is stale: run python -m lepton_ray.config.docs"
    )


def test_check_exits_1_on_a_stale_page_and_0_on_a_fresh_one(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text(render().replace("Passes over the training set.", "Passes."))
    assert main(["--check", "--path", str(page)]) == 1
    assert "is stale" in capsys.readouterr().err
    assert main(["--path", str(page)]) == 0 and main(["--check", "--path", str(page)]) == 0


def test_every_field_has_a_docstring_and_a_row():
    text = render()
    for _, cls, _ in sections(PipelineConfig, ""):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            section = dataclasses.is_dataclass(f.default_factory) or "schema" in f.metadata
            assert section or f"| `{f.name}` |" in text, f.name
    for section in ("`train.optim`", "`train.data`", "`train.scaling`", "`promote.serve`"):
        assert f"## {section}:" in text
    assert "| `epochs` | int | `10` | >= 1 |" in text
    assert "| `auth_token` | str \\| null | `null` | secret |" in text
