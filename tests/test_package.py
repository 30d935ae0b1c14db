"""The installed package is complete: what a wheel must ship, checked where jaxbn is imported from.

`.ci/run` builds the wheel, installs it (not editable) into fresh virtual
environments and runs this suite from a copy of tests/ outside the repository
with ``JAXBN_EXPECT_INSTALLED=1``: these tests then see the installed files,
so a module or a ``py.typed`` missing from the wheel fails them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import os
import pkgutil

import pytest

import jaxbn

INSTALLED = os.environ.get("JAXBN_EXPECT_INSTALLED") == "1"


def test_py_typed_is_shipped():
    assert importlib.resources.files("jaxbn").joinpath("py.typed").is_file(), "jaxbn/py.typed is missing"


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(jaxbn.__path__, "jaxbn.") if not m.name.endswith("__main__")]
    for required in ("jaxbn.linen", "jaxbn.nnx", "jaxbn.interop", "jaxbn.equinox", "jaxbn.haiku"):
        assert required in names, f"{required} is not in the package"
    for name in names:
        importlib.import_module(name)


def test_public_names_resolve():
    for name in jaxbn.__all__:
        assert getattr(jaxbn, name) is not None


@pytest.mark.skipif(not INSTALLED, reason="checks the built wheel; .ci/run sets JAXBN_EXPECT_INSTALLED=1")
def test_imported_from_the_installed_wheel():
    path = os.path.dirname(os.path.abspath(jaxbn.__file__))
    assert "site-packages" in path.split(os.sep), f"jaxbn was imported from {path}, not from an installation"
    assert not os.path.exists(os.path.join(os.path.dirname(path), "pyproject.toml")), path
    dist = importlib.metadata.distribution("jaxbn")
    assert dist.version == jaxbn.__version__, "the wheel's version is not jaxbn.__version__ (the single source)"
    assert not (dist.read_text("direct_url.json") or "").count('"editable": true'), "an editable install"


@pytest.mark.skipif(not INSTALLED, reason="checks the built wheel; .ci/run sets JAXBN_EXPECT_INSTALLED=1")
def test_the_wheel_holds_only_the_library():
    """The benchmarks, tests, examples and docs stay in the repository: the wheel ships `jaxbn/` alone."""
    files = importlib.metadata.distribution("jaxbn").files or []
    tops = {f.parts[0] for f in files if not f.parts[0].endswith(".dist-info") and f.parts[0] != ".."}
    assert tops == {"jaxbn"}, f"the wheel ships {sorted(tops)}"
