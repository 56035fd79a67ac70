"""The method registry, the README table generated from it, the project's method index and `list`/`show`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lit_methods.registry import (
    METHODS,
    NOTE_MAX_CHARS,
    MethodEntry,
    close_matches,
    describe,
    first_paragraph,
    format_list,
    format_table,
    get_method,
    import_method,
    with_registry_table,
)

REPO = Path(__file__).resolve().parents[1]
INDEX = REPO.parent / "shared" / "methods" / "INDEX.md"
# Registered beside the index's methods: the supervised baseline and the self-supervised bases the methods build on.
NOT_IN_INDEX = {"baseline", "simclr", "barlow-twins", "simsiam", "moco-v2", "linear-eval"}
AVAILABLE = [e for e in METHODS.values() if e.status != "planned"]


def test_readme_table_is_the_registry():
    readme = (REPO / "README.md").read_text()
    assert readme == with_registry_table(readme), "README table is stale: run `python -m lit_methods.registry`"
    for entry in METHODS.values():
        assert f"| `{entry.slug}` |" in readme


@pytest.mark.skipif(not INDEX.is_file(), reason="the method index lives in ../shared/")
def test_registry_has_every_method_of_the_index():
    rows = re.findall(r"^\| \d+ \| ([a-z0-9-]+) \| (.+?) \| (.+?) \|", INDEX.read_text(), flags=re.M)
    assert len(rows) == 44
    assert {slug for slug, _, _ in rows} | NOT_IN_INDEX == set(METHODS)
    for slug, paper, family in rows:
        assert METHODS[slug].paper == paper and METHODS[slug].family == family


@pytest.mark.parametrize("entry", AVAILABLE, ids=lambda e: e.slug)
def test_every_available_method_names_its_slug_and_a_discovered_cpu_config(entry):
    implementation = import_method(entry.slug)
    assert getattr(implementation, "slug", None) == entry.slug, f"{entry.import_path} lacks slug = {entry.slug!r}"
    assert entry.configs and all((REPO / c).is_file() for c in entry.configs)
    assert entry.cpu_config in entry.configs


def test_configs_are_discovered_from_the_experiments_folder():
    on_disk = sorted(f"experiments/mlc/{p.name}" for p in (REPO / "experiments" / "mlc").glob("*.yaml"))
    assert list(METHODS["mlc"].configs) == on_disk
    assert METHODS["baseline"].configs[0] == "experiments/quickstart.yaml"
    assert all(c.startswith("experiments/ssl/simclr_") for c in METHODS["simclr"].configs)


def test_entries_are_checked_at_construction():
    fields = dict(slug="x", paper="P", url="https://example.org", family="f", kind="module", import_path="a.B")
    with pytest.raises(ValueError, match="cpu_config"):
        MethodEntry(**fields, status="available")
    with pytest.raises(ValueError, match="planned method has no configs"):
        MethodEntry(**fields, cpu_config="experiments/x/x.yaml")
    with pytest.raises(ValueError, match=f"at most {NOTE_MAX_CHARS}"):
        MethodEntry(**fields, note="n" * (NOTE_MAX_CHARS + 1))
    with pytest.raises(ValueError, match="'Bad Slug'"):
        MethodEntry(**{**fields, "slug": "Bad Slug"})
    with pytest.raises(TypeError):
        MethodEntry("x", "P", "https://example.org", "f", "module", "a.B")  # keyword arguments only


def test_planned_methods_do_not_pretend_to_run(monkeypatch):
    # every seed method has landed; a row registered before its code is planned, like this one
    planned = MethodEntry(
        slug="future-method",
        paper="A Future Paper",
        url="https://arxiv.org/abs/0000.00000",
        family="supervised",
        kind="module",
        import_path="lit_methods.supervised.FutureMethod",
    )
    monkeypatch.setitem(METHODS, planned.slug, planned)
    assert planned.run == "—" and planned.configs == ()
    with pytest.raises(ImportError, match=planned.slug):
        import_method(planned.slug)


def test_every_entry_names_a_paper_link_and_a_short_note():
    for entry in METHODS.values():
        assert entry.url.startswith("https://"), entry.slug
        assert len(entry.note) <= NOTE_MAX_CHARS, entry.slug


def test_unknown_slug_names_close_matches():
    with pytest.raises(KeyError, match="did you mean simclr"):
        get_method("simclrr")
    assert "ssl-ey" in close_matches("ssl")
    with pytest.raises(KeyError, match="baseline"):
        get_method("zzzz-nothing-alike")


def test_list_has_one_line_per_method_within_80_columns():
    lines = format_list().splitlines()
    assert len(lines) == len(METHODS) + 1
    assert all(len(line) <= 80 for line in lines)
    assert [line.split()[0] for line in lines[1:]] == list(METHODS)
    assert any(line.endswith("…") for line in lines), "long titles are cut with an ellipsis"
    assert format_table().count("\n") == len(METHODS) + 1


def test_show_prints_paper_code_configs_and_docstring():
    entry = METHODS["mlc"]
    text = describe("mlc")
    for expected in (entry.paper, entry.url, entry.import_path, entry.cpu_config, entry.status, entry.note):
        assert expected in text
    assert all(config in text for config in entry.configs)
    assert first_paragraph(import_method("mlc").__doc__) in " ".join(text.split())
    planned = [e.slug for e in METHODS.values() if e.status == "planned"]
    assert not planned or "planned" in describe(planned[0])
