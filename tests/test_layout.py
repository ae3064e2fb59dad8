"""The README's layout section is generated from the package, and stays true."""

from __future__ import annotations

import pytest

from mechfin_utils.tooling import layout


def test_readme_layout_section_is_what_the_package_says():
    readme = (layout.REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert layout.with_section(readme) == readme, "run: python -m mechfin_utils.tooling.layout --write"
    section = layout.layout_section()
    for path in sorted(layout.PACKAGE.rglob("*.py")):  # every module is in it, by name
        if path.name != "__init__.py":
            assert f" {path.name} " in section or f" {path.name}\n" in section, path


def test_first_sentence_stops_at_a_sentence_not_at_an_abbreviation(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Knockout (Geva et al. 2023), e.g. of heads. More text.\n\nDetails."""\n')
    assert layout.first_sentence(module) == "Knockout (Geva et al. 2023), e.g. of heads."
    module.write_text("x = 1\n")
    with pytest.raises(ValueError, match="has no docstring"):
        layout.first_sentence(module)
