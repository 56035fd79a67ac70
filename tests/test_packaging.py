"""pyproject.toml lists every package of the source tree, so an installed wheel has all of them."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def test_every_source_package_is_listed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(("lit_methods", *init.parent.relative_to(REPO).parts) if top != "lit_methods" else init.parent.relative_to(REPO).parts)
        for top in ("lit_methods", "datamodules", "callbacks")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert not {"datamodules", "callbacks"} & listed, "only lit_methods is installed at the top level"
    for folder in ("experiments", "datamodules", "callbacks"):
        assert config["package-dir"][f"lit_methods.{folder}"] == folder


def test_a_project_with_its_own_datamodules_and_callbacks_does_not_shadow_ours(tmp_path):
    """Run the CLI from a folder holding a ``datamodules/`` package and a ``callbacks.py`` of its own (common in
    Lightning projects): ours are imported as ``lit_methods.datamodules`` and ``lit_methods.callbacks``."""
    import subprocess
    import sys

    (tmp_path / "datamodules").mkdir()
    (tmp_path / "datamodules" / "__init__.py").write_text("MINE = True\n")
    (tmp_path / "callbacks.py").write_text("MINE = True\n")
    (tmp_path / "use_both.py").write_text(
        "import callbacks, datamodules\n"
        "from lit_methods.callbacks import ErrorFeedbackDP\n"
        "from lit_methods.datamodules import FashionMNISTDataModule\n"
        "assert callbacks.MINE and datamodules.MINE\n"
    )
    run = dict(cwd=tmp_path, capture_output=True, text=True)
    script = subprocess.run([sys.executable, "use_both.py"], **run)
    assert script.returncode == 0, script.stderr
    cli = [sys.executable, "-m", "lit_methods", "fit", "--config", "experiments/quickstart.yaml", "--print_config"]
    printed = subprocess.run(cli, **run)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "class_path: lit_methods.datamodules.FashionMNISTDataModule" in printed.stdout
