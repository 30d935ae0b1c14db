"""Import rules of docs/architecture.md, checked by parsing the imports with `ast` (nothing is imported).

Core: jax, numpy and stdlib only. Module core: no framework either. Wrappers: the core, the module core and
their own framework, never each other, and no statistics maths of their own. The benchmarks: in
the repository's top-level `benchmarks/`, never in the package. Plus one subprocess that reads `sys.modules`
after `import jaxbn` / `import jaxbn.linen`.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "jaxbn")

CORE = {"jaxbn", "jaxbn._checks", "jaxbn._layout", "jaxbn._xla", "jaxbn._running", "jaxbn._stats",
        "jaxbn._kernel", "jaxbn._norm", "jaxbn._fold", "jaxbn._accumulate"}
MODULE_CORE = {"jaxbn._module_core", "jaxbn._dtypes", "jaxbn._ghost", "jaxbn._recompute", "jaxbn._convert"}
WRAPPERS = {"jaxbn.linen": "flax", "jaxbn.nnx": "flax", "jaxbn.interop": "flax", "jaxbn.equinox": "equinox",
            "jaxbn.haiku": "haiku"}
FRAMEWORKS = {"flax", "equinox", "haiku", "optax", "torch"}
# Statistics and collectives a wrapper must take from the core instead of computing itself.
MATHS = {("lax", "psum"), ("lax", "pmean"), ("lax", "all_gather"), ("lax", "psum_scatter"), ("lax", "rsqrt"),
         ("jnp", "mean"), ("jnp", "var"), ("jnp", "std"), ("jnp", "sqrt")}


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules():
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                out[_module_name(path)] = path
    return out


MODULES = _modules()


def _imports(name):
    """Every module `name` imports (absolute names; `from a import b` counts as a and a.b when a.b is a module)."""
    path = MODULES[name]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def _top(module):
    return module.split(".")[0]


def test_the_layers_cover_every_module():
    layered = CORE | MODULE_CORE | set(WRAPPERS)
    assert set(MODULES) - layered == set(), "add the new module to a layer here and in docs/architecture.md"
    assert CORE | MODULE_CORE | set(WRAPPERS) <= set(MODULES)


def test_import_parser_sees_relative_and_from_imports():
    assert "jaxbn._checks" in _imports("jaxbn._layout")
    assert {"flax", "flax.linen"} <= _imports("jaxbn.linen")
    assert "jaxbn._module_core" in _imports("jaxbn.linen")


@pytest.mark.parametrize("name", sorted(CORE))
def test_core_knows_no_framework_and_nothing_above_it(name):
    imports = _imports(name)
    assert {m for m in imports if _top(m) in FRAMEWORKS} == set()
    # lazy `importlib.import_module` of a wrapper (jaxbn.linen on attribute access) is not an import at load
    above = {m for m in imports if _top(m) == "jaxbn" and m not in CORE}
    assert above == set(), f"{name} imports {sorted(above)} above the core"


@pytest.mark.parametrize("name", sorted(MODULE_CORE))
def test_module_core_knows_no_framework(name):
    imports = _imports(name)
    assert {m for m in imports if _top(m) in FRAMEWORKS} == set()
    assert {m for m in imports if _top(m) == "jaxbn"} <= CORE | MODULE_CORE


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrappers_use_the_core_and_their_framework_only(name):
    imports = _imports(name)
    frameworks = {_top(m) for m in imports if _top(m) in FRAMEWORKS}
    assert frameworks <= {WRAPPERS[name]}, f"{name} imports {sorted(frameworks)}"
    jaxbn_imports = {m for m in imports if _top(m) == "jaxbn"}
    assert jaxbn_imports <= CORE | MODULE_CORE, f"{name} imports {sorted(jaxbn_imports - CORE - MODULE_CORE)}"


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrappers_do_not_reimplement_the_maths(name):
    with open(MODULES[name]) as f:
        tree = ast.parse(f.read())
    calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
            calls.add((owner_name, node.func.attr))
    assert calls & MATHS == set(), f"{name} computes {sorted(calls & MATHS)}; use jaxbn's core functions"


def test_benchmarks_are_outside_the_package():
    """The benchmarks live in the repository's top-level `benchmarks/` (run from a clone), not in the wheel."""
    assert not os.path.exists(os.path.join(PKG, "bench"))
    assert os.path.isfile(os.path.join(ROOT, "benchmarks", "__main__.py"))
    for name in MODULES:
        bench = {m for m in _imports(name) if _top(m) == "benchmarks"}
        assert bench == set(), f"{name} imports {sorted(bench)}"


def test_interop_uses_no_private_fold_names():
    with open(MODULES["jaxbn.interop"]) as f:
        tree = ast.parse(f.read())
    private = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
               if a.name.startswith("_")]
    assert private == []


def test_the_checker_catches_a_violation(tmp_path, monkeypatch):
    """The rules can fail: a core module that imports flax is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import flax.linen as nn\nfrom jaxbn import linen\n")
    monkeypatch.setitem(MODULES, "jaxbn._bad", str(bad))
    assert {"flax.linen", "jaxbn.linen"} <= _imports("jaxbn._bad")
    with pytest.raises(AssertionError):
        test_core_knows_no_framework_and_nothing_above_it("jaxbn._bad")


_PROBE = """
import sys
import {module}
heavy = ("flax", "flax.linen", "flax.nnx", "equinox", "haiku", "benchmarks", "optax")
print(sorted(m for m in heavy if m in sys.modules))
"""


@pytest.mark.parametrize(
    "module, absent",
    [
        ("jaxbn", ["equinox", "flax", "flax.linen", "flax.nnx", "haiku", "benchmarks", "optax"]),
        ("jaxbn.linen", ["equinox", "haiku", "benchmarks", "optax"]),
        ("jaxbn.nnx", ["equinox", "haiku", "benchmarks"]),  # flax.nnx itself imports optax
    ],
)
def test_import_loads_no_other_framework(module, absent):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(module=module)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = set(ast.literal_eval(proc.stdout.strip().splitlines()[-1]))
    assert loaded & set(absent) == set(), f"import {module} loads {sorted(loaded & set(absent))}"
