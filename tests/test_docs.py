"""The documentation works: README and guide code runs, every public name has a doctested example.

* Every ```python block of README.md and of the guide pages in DOC_PAGES runs,
  each in a fresh namespace, in one subprocess with 8 simulated CPU devices
  (the sync-BN blocks need them).
  A block whose first line is a comment starting with ``# not run`` (e.g.
  ``# not run: needs 2 processes``) is only compiled, not run.
* Every name in ``jaxbn.__all__`` and in the ``__all__`` of ``jaxbn.linen``,
  ``jaxbn.nnx`` and ``jaxbn.interop`` has a docstring with a ``>>>`` example
  (run by pytest's --doctest-modules); a constant is described in its module's
  docstring or a public function's.
* The README keeps the exact commands CI and new users run, and its relative
  links and images point at files that exist.
* Every example has a header saying how to run it and a row in docs/examples.md.
* CHANGELOG.md has an entry for ``jaxbn.__version__``, newest first.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# Guide pages whose ```python blocks run (the other pages' owners test theirs).
DOC_PAGES = ("docs/index.md", "docs/quickstart.md", "docs/sync.md", "docs/modules.md", "docs/deploy.md")
PUBLIC_MODULES = ("jaxbn", "jaxbn.linen", "jaxbn.nnx", "jaxbn.interop")
TEST_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest'
DEMO_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[examples]" && .venv/bin/python examples/demo.py'


def python_blocks(path: str) -> list[tuple[str, str]]:
    """("path:line", code) of every ```python block of the Markdown file `path` (relative to the root)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M):
        blocks.append((f"{path}:{text.count(chr(10), 0, m.start()) + 1}", m.group(1)))
    return blocks


def is_not_run(code: str) -> bool:
    first = next((line.strip() for line in code.splitlines() if line.strip()), "")
    return first.lower().startswith("# not run")


README_BLOCKS = python_blocks("README.md")
BLOCKS = README_BLOCKS + [b for page in DOC_PAGES for b in python_blocks(page)]

# Runs each block in a fresh namespace; prints one JSON line per block.
_RUNNER = r"""
import json, sys, traceback
blocks = json.load(sys.stdin)
for line, code, compile_only in blocks:
    try:
        compiled = compile(code, line, "exec")
        if not compile_only:
            exec(compiled, {"__name__": "__readme__"})
        print(json.dumps({"line": line, "ok": True}), flush=True)
    except BaseException:
        print(json.dumps({"line": line, "ok": False, "error": traceback.format_exc()[-4000:]}), flush=True)
"""


@pytest.fixture(scope="module")
def block_results() -> dict[str, dict]:
    env = dict(os.environ, MPLBACKEND="Agg")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
    payload = json.dumps([(line, code, is_not_run(code)) for line, code in BLOCKS])
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=payload, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    results = {}
    for out in proc.stdout.splitlines():
        if out.startswith("{"):
            r = json.loads(out)
            results[r["line"]] = r
    if len(results) != len(BLOCKS):
        pytest.fail(f"Markdown block runner stopped early (rc {proc.returncode}):\n"
                    f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return results


def test_readme_and_quickstart_have_python_blocks():
    assert any(not is_not_run(code) for _, code in README_BLOCKS), "README.md should show a runnable example"
    quick = python_blocks("docs/quickstart.md")
    assert sum(not is_not_run(code) for _, code in quick) >= 4, (
        "docs/quickstart.md should show the functional API, Linen, NNX and sync-BN in ```python blocks")


@pytest.mark.parametrize("where", [where for where, _ in BLOCKS], ids=[where for where, _ in BLOCKS])
def test_markdown_block_runs(where, block_results):
    r = block_results[where]
    assert r["ok"], f"the ```python block at {where} failed:\n{r['error']}"


def test_readme_keeps_the_commands():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert TEST_COMMAND in lines, "CI greps README.md for the exact test command line"
    assert DEMO_COMMAND in lines
    assert os.path.exists(os.path.join(ROOT, "examples", "demo.py"))


def test_readme_images_and_links_exist():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert images, "README.md should show the demo's plot"
    links = re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", text)
    assert "docs/api.md" in links and "docs/quickstart.md" in links, "README.md should link into the docs"
    for path in links:
        if not path.startswith(("http://", "https://")):
            assert os.path.exists(os.path.join(ROOT, path)), f"README.md links to {path}, which does not exist"


def test_changelog_names_the_current_version():
    import jaxbn

    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
        releases = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", f.read(), flags=re.M)
    assert releases, "CHANGELOG.md has no '## X.Y.Z' release heading"
    assert jaxbn.__version__ in releases, f"CHANGELOG.md has no '## {jaxbn.__version__}' entry (jaxbn.__version__)"
    newest = tuple(int(p) for p in releases[0].split("."))
    assert newest >= tuple(int(p) for p in jaxbn.__version__.split(".")), "CHANGELOG.md's newest entry must come first"


# Docstrings without an example yet, in files outside this test's owner's; drop an entry once fixed.
KNOWN_MISSING_EXAMPLE: dict[str, str] = {}


def public_names() -> list:
    out = []
    for modname in PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        assert hasattr(mod, "__all__"), f"{modname} has no __all__"
        for name in mod.__all__:
            reason = KNOWN_MISSING_EXAMPLE.get(f"{modname}.{name}")
            marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
            out.append(pytest.param(modname, name, marks=marks, id=f"{modname}.{name}"))
    return out


@pytest.mark.parametrize("modname, name", public_names())
def test_public_name_has_docstring_with_example(modname, name):
    mod = importlib.import_module(modname)
    obj = getattr(mod, name)
    if not (inspect.isclass(obj) or callable(obj)):
        # A constant has no docstring of its own: its module or a public function must describe it.
        home = importlib.import_module(getattr(obj, "__module__", None) or modname)
        docs = [inspect.getdoc(mod) or "", inspect.getdoc(home) or ""]
        docs += [inspect.getdoc(getattr(mod, n)) or "" for n in mod.__all__ if callable(getattr(mod, n))]
        assert any(name in d for d in docs), f"{modname}.{name} is not described in any docstring"
        return
    doc = obj.__doc__ or ""
    assert doc.strip(), f"{modname}.{name} has no docstring"
    if inspect.isclass(obj) and tuple in obj.__mro__ and doc.startswith(f"{name}("):
        pytest.fail(f"{modname}.{name} has only the generated NamedTuple docstring")
    assert ">>>" in doc, f"{modname}.{name}'s docstring has no >>> example"
    if inspect.isfunction(obj):
        assert re.search(r"^\s*(Args|Returns):", doc, flags=re.M), f"{modname}.{name}'s docstring has no Args:/Returns:"


EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_has_header_and_docs_entry(name):
    import ast

    with open(os.path.join(ROOT, "examples", name), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    assert len(doc.splitlines()) >= 3, f"examples/{name} needs a docstring header saying what it shows"
    assert f"examples/{name}" in doc, f"examples/{name}'s docstring should say how to run it (python examples/{name})"
    with open(os.path.join(ROOT, "docs", "examples.md"), encoding="utf-8") as f:
        assert f"| `{name}` |" in f.read(), f"examples/{name} is missing from docs/examples.md's table"


# ------------------------------------------------------------------ paths and links the docs cite

DOC_FILES = ["README.md", "CHANGELOG.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")
)
# Written by `python -m benchmarks figures`: cited before the first measurement is committed.
GENERATED = {"docs/figures.json"}
_TOP = sorted(
    f for f in os.listdir(ROOT) if not f.startswith(".") and (os.path.isdir(os.path.join(ROOT, f)) or "." in f)
)
_PATH_RE = re.compile(r"`((?:" + "|".join(re.escape(t) for t in _TOP) + r")(?:/[\w.\-/]*)?)(?:[:#][^`]*)?`")


def cited(path: str) -> tuple[list[str], list[str]]:
    """(relative link targets, repository paths in code spans) of the Markdown file `path`."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    text_no_code = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    links = [t for t in re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", text_no_code) if "://" not in t
             and not t.startswith("mailto:")]  # fmt: skip
    spans = [p for p in _PATH_RE.findall(text_no_code) if "*" not in p]
    return links, spans


@pytest.mark.parametrize("path", DOC_FILES)
def test_cited_paths_and_links_exist(path):
    """Every relative link and every repository path in a code span of README.md, CHANGELOG.md and docs/ exists."""
    links, spans = cited(path)
    base = os.path.dirname(os.path.join(ROOT, path))
    for link in links:
        target = os.path.normpath(os.path.join(base, link))
        if os.path.relpath(target, ROOT) not in GENERATED:
            assert os.path.exists(target), f"{path} links to {link}, which does not exist"
    for span in spans:
        if span not in GENERATED:
            assert os.path.exists(os.path.join(ROOT, span)), f"{path} cites `{span}`, which does not exist"


def test_cited_path_finder_finds_what_it_must():
    links, spans = cited("README.md")
    assert "docs/quickstart.md" in links and "examples/demo.py" in spans


@pytest.mark.parametrize("modname, name", [p.values for p in public_names()])
def test_arguments_are_documented_one_by_one(modname, name):
    """A Google "a, b: ..." entry hides `a` and `b` from the API page's table (both then show as required)."""
    obj = getattr(importlib.import_module(modname), name)
    if not inspect.isfunction(obj):
        return
    args = re.search(r"^\s*Args:\n(.*?)(?:^\s*\w+:\n|\Z)", inspect.getdoc(obj) or "", flags=re.S | re.M)
    grouped = re.findall(r"^\s+(\w+(?:, \w+)+):", args.group(1), flags=re.M) if args else []
    assert not grouped, f"{modname}.{name} documents {grouped} together: give each argument its own entry"
