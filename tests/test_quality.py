"""Quality gates run with the test suite: ruff and mypy clean on the package."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else shutil.which(name)


@pytest.mark.parametrize(
    "name, args",
    [("ruff", ["check", "jaxbn", "tests", "examples", "conftest.py"]), ("mypy", ["jaxbn"])],
)
def test_tool_is_clean(name, args):
    exe = _tool(name)
    if exe is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    proc = subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_py_typed_is_shipped():
    assert os.path.exists(os.path.join(ROOT, "jaxbn", "py.typed"))


def test_mypy_is_strict_on_the_package():
    """Every function in jaxbn/ is annotated (mypy's disallow_untyped_defs runs in test_tool_is_clean)."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        mypy = tomllib.load(f)["tool"]["mypy"]
    assert mypy["packages"] == ["jaxbn"]
    assert mypy.get("disallow_untyped_defs") is True and mypy.get("disallow_incomplete_defs") is True
