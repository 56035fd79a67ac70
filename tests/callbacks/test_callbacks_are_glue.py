"""The design's directions of dependence for callbacks and the library modules they use (DESIGN.md): a callback
imports ``lit_methods.nets``, library modules, torch and lightning, never a method family; the library modules that
hold the callbacks' algorithms (``privacy``, ``quantization``, ``pruning``) import no Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lit_methods
import lit_methods.callbacks

PACKAGE = Path(lit_methods.__file__).parent
CALLBACKS = Path(lit_methods.callbacks.__file__).parent
LIBRARY_MODULES = {"nets", "losses", "privacy", "quantization", "pruning", "datamodules", "callbacks"}
LIGHTNING_FREE = ("privacy", "quantization", "pruning")


def families() -> set[str]:
    """Every sub-package of lit_methods that is not a library module is a method family."""
    return {init.parent.name for init in PACKAGE.glob("*/__init__.py")} - LIBRARY_MODULES


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against ``package``); an import
    inside a function or a ``TYPE_CHECKING`` block counts too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # "from lit_methods import ssl"
    return names


def python_files(folder: Path, package: str) -> list[tuple[Path, str]]:
    files = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        files.append((path, ".".join((package, *parts[:-1]))))  # the package the file lives in
    return files


def test_the_family_list_is_derived_from_the_package():
    found = families()
    assert {"ssl", "supervised"} <= found, found  # families that exist today
    assert not found & LIBRARY_MODULES


@pytest.mark.parametrize("path,package", python_files(CALLBACKS, "lit_methods.callbacks"), ids=lambda v: str(v))
def test_a_callback_imports_no_method_family(path, package):
    forbidden = {f"lit_methods.{family}" for family in families()}
    imported = imported_modules(path, package)
    offending = sorted(name for name in imported if any(name == f or name.startswith(f + ".") for f in forbidden))
    assert not offending, f"{path.name} imports method families {offending}: move the shared code to a library module"


@pytest.mark.parametrize("library", LIGHTNING_FREE)
def test_the_callbacks_library_modules_import_no_lightning(library):
    files = python_files(PACKAGE / library, f"lit_methods.{library}")
    assert files, f"lit_methods/{library} has no module"
    for path, package in files:
        lightning = sorted(
            name
            for name in imported_modules(path, package)
            if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")
        )
        where = path.relative_to(PACKAGE.parent)
        assert not lightning, f"{where} imports {lightning}: keep library modules free of Lightning"


def test_the_import_scan_sees_family_and_lightning_imports(tmp_path):
    """The scan itself: each form of import of a family or of Lightning is found."""
    module = tmp_path / "sample.py"
    module.write_text(
        "import lightning as L\n"
        "from lit_methods import ssl\n"
        "from lit_methods.supervised.baseline import X\n"
        "def late():\n"
        "    import pytorch_lightning\n"
        "from .. import robustness\n"
    )
    names = imported_modules(module, "lit_methods.callbacks")
    assert {"lightning", "lit_methods.ssl", "lit_methods.supervised.baseline", "pytorch_lightning"} <= names
    assert "lit_methods.robustness" in names


def test_dead_neuron_rate_is_the_pruning_metric_re_exported():
    from lit_methods.callbacks import DeadNeuronRate
    from lit_methods.pruning import DeadNeuronRate as library_metric

    assert DeadNeuronRate is library_metric
