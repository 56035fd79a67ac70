"""The method registry, the README table generated from it, and the project's method index."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lit_methods.registry import METHODS, format_table, get_method, import_method, with_registry_table

REPO = Path(__file__).resolve().parents[1]
INDEX = REPO.parent / "shared" / "methods" / "INDEX.md"


def test_readme_table_is_the_registry():
    readme = (REPO / "README.md").read_text()
    assert readme == with_registry_table(readme), "README table is stale: run `python -m lit_methods.registry`"
    for entry in METHODS.values():
        assert f"| `{entry.slug}` |" in readme


@pytest.mark.skipif(not INDEX.is_file(), reason="the method index lives in ../shared/")
def test_registry_has_every_method_of_the_index():
    rows = re.findall(r"^\| \d+ \| ([a-z0-9-]+) \| (.+?) \| (.+?) \|", INDEX.read_text(), flags=re.M)
    assert len(rows) == 44
    assert {slug for slug, _, _ in rows} | {"baseline"} == set(METHODS)
    for slug, paper, family in rows:
        assert METHODS[slug].paper == paper and METHODS[slug].family == family


def test_every_available_method_imports_and_has_configs():
    available = [e for e in METHODS.values() if e.status != "planned"]
    assert available, "the baseline at least is available"
    for entry in available:
        assert import_method(entry.slug) is not None
        assert entry.configs and all((REPO / c).is_file() for c in entry.configs)


def test_planned_methods_do_not_pretend_to_run():
    planned = next(e for e in METHODS.values() if e.status == "planned")
    assert planned.run == "—"
    with pytest.raises(ImportError, match=planned.slug):
        import_method(planned.slug)


def test_every_entry_names_a_paper_link():
    for entry in METHODS.values():
        assert entry.url and entry.url.startswith("https://"), entry.slug


def test_unknown_slug_lists_the_known_ones():
    with pytest.raises(KeyError, match="baseline"):
        get_method("no-such-method")


def test_plain_table_lists_every_slug():
    text = format_table()
    assert all(slug in text for slug in METHODS)
