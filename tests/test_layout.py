"""The repository layout must not shadow installed packages or drift from what the README promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mlflow_folder_does_not_shadow_the_mlflow_package():
    # Run from the repo root, where the top-level mlflow/ folder is on sys.path.
    result = subprocess.run(
        [sys.executable, "-c", "import mlflow, sys; print(mlflow.__file__); print(mlflow.__version__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    location, version = result.stdout.split()
    assert "site-packages" in location
    assert version.startswith("3.")
    assert not list((REPO / "mlflow").glob("*.py"))


def test_top_level_layout():
    for name in ["flows", "omnilong", "dvc.yaml", "params.yaml", "mlflow", "tests", "README.md",
                 ".ci/run", "pyproject.toml", "Makefile"]:
        assert (REPO / name).exists(), name
