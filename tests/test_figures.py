"""The published figures: README.md and docs/benchmark.md quote docs/figures.json exactly, and the machinery.

* The quoted figures are rendered in memory from ``docs/figures.json`` and
  compared with the files (no benchmark runs here); the test skips until the
  first measurement is committed (``python -m benchmarks figures``, then
  ``python -m benchmarks render``).
* The renderer rewrites the tagged rows and blocks only, from a saved quick
  run (``tests/data/figures_quick.json``; regenerate it with
  ``python -m benchmarks figures --quick --out tests/data/figures_quick.json``
  when the reports change shape).
* The README's numerical claims (`benchmarks.claims`), checked against what
  float32 arithmetic and each library's documented rule imply.
* ``figures --quick`` writes the metadata the pages quote (commit, versions, device, date).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import claims, figures, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "tests", "data", "figures_quick.json")


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def quick() -> dict:
    return render.load(QUICK)


def test_quoted_figures_match_the_json():
    path = os.path.join(ROOT, figures.FIGURES_JSON)
    if not os.path.exists(path):
        pytest.skip("docs/figures.json not measured yet: python -m benchmarks figures && python -m benchmarks render")
    fig = render.load(path)
    assert not fig["meta"]["quick"], "docs/figures.json comes from a --quick run"
    assert set(fig["meta"]["parts"]) == set(figures.PARTS)
    for rel, (old, new) in render.render_files(fig).items():
        assert old == new, f"{rel} quotes figures that differ from docs/figures.json: run python -m benchmarks render"


def test_every_tag_has_a_renderer_and_every_renderer_a_tag():
    readme = read("README.md")
    pages = read("docs/benchmark.md") + read("docs/sync.md")
    assert set(re.findall(r"^\| <!-- fig:([\w-]+) -->", readme, flags=re.M)) == set(render.ROWS)
    opened = re.findall(r"^<!-- figures:([\w-]+) -->$", pages, flags=re.M)
    closed = re.findall(r"^<!-- /figures:([\w-]+) -->$", pages, flags=re.M)
    assert sorted(opened) == sorted(closed)  # a block may appear on both pages
    assert set(opened) == set(render.BLOCKS)


def test_render_rewrites_tagged_rows_only(quick):
    text = read("README.md")
    out = render.render_text(text, quick)
    before, after = text.splitlines(), out.splitlines()
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        if not a.startswith("| <!-- fig:"):
            assert a == b  # prose rows and the rest of the README stay as written
        else:
            assert b.count(" | ") == a.count(" | ") == 4, b  # the table keeps its five columns
    assert render.render_text(out, quick) == out  # idempotent
    ov = quick["claims"]["offset_variance"]
    flax_row = next(line for line in after if "fig:offset-var" in line).split(" | ")[2]
    assert flax_row.startswith("var ∈ {" + ", ".join(f"{v:g}" for v in ov["flax"]["values"]) + "}")


def test_a_changed_figure_is_detected(quick):
    text = render.render_text(read("README.md"), quick)
    changed = copy.deepcopy(quick)
    changed["claims"]["batch_mode_ema"]["equinox"] += 1.0
    assert render.render_text(text, changed) != text
    changed = copy.deepcopy(quick)
    row = next(r for r in changed["model"]["results"] if r["impl"] == "jaxbn.linen" and r["bn"])
    row["bn"]["bytes_vs_flax"] *= 1.5
    assert render.render_text(text, changed) != text


def test_benchmark_page_blocks_render(quick):
    page = render.render_text(read("docs/benchmark.md"), quick)
    assert "Not measured at this commit yet" not in page
    assert "A `--quick` run" in page  # a quick file says so wherever it is rendered
    assert quick["meta"]["commit"][:12] in page
    assert len(page.splitlines()) < 280  # a page read in five minutes (the full grid adds a dozen rows)
    assert "| train+grad | float32 |" in page and "limit" not in page


def test_unknown_tags_and_missing_parts_are_errors(quick):
    with pytest.raises(render.RenderError, match="unknown figure row tag 'nope'"):
        render.render_text("| <!-- fig:nope --> a | b |\n", quick)
    with pytest.raises(render.RenderError, match="unknown figure block tag 'nope'"):
        render.render_text("<!-- figures:nope -->\nx\n<!-- /figures:nope -->\n", quick)
    with pytest.raises(render.RenderError, match="no 'layer' part"):
        render.render_text("| <!-- fig:residuals --> a |\n", {k: v for k, v in quick.items() if k != "layer"})


def test_render_refuses_a_quick_file(capsys):
    with pytest.raises(SystemExit) as e:
        render.main(["--check", "--json", QUICK])
    assert e.value.code == 2 and "--quick run" in capsys.readouterr().err


def test_offset_variance_claims():
    r = claims.offset_variance(seeds=2)
    data = [np.asarray(claims.OFFSET + jax.random.normal(jax.random.key(s), claims.SHAPE), np.float64) for s in (0, 1)]
    truth = [np.var(x, axis=0) for x in data]
    assert r["true_var_range"] == [float(np.min(truth)), float(np.max(truth))]
    # float32 values near 1e8 are 8 apart: E[x²] − E[x]² is a multiple of 8; flax clamps it at 0.
    assert all(v % 8 == 0 and v >= 0 for v in r["flax"]["values"])
    assert r["flax"]["max_rel_error"] > 0.5
    assert r["jaxbn"]["max_rel_error"] < 1e-3 and r["jaxbn"]["max_rel_error_masked"] < 1e-3
    assert r["jaxbn"]["nan_outputs"] == 0
    if "haiku" in r:  # unclamped: negative variances, NaN outputs
        assert all(v % 8 == 0 for v in r["haiku"]["values"] if math.isfinite(v))
        assert (min(r["haiku"]["values"]) < 0) == (r["haiku"]["nan_outputs"] > 0)
    if "equinox" in r:  # two-pass: right
        assert r["equinox"]["max_rel_error"] < 1e-3


def test_batch_mode_ema_claims():
    r = claims.batch_mode_ema()
    m, k = r["momentum"], r["steps"]
    assert r["data_var"] == 9.0 and 6 < r["mean_batch_var"] < 12
    # The EMA from 1 after 10 steps at 0.99 weighs the initial 1 by 0.99**10 and the batches by the rest.
    assert m**k + (1 - m**k) * 6 < r["ema"] < m**k + (1 - m**k) * 12
    assert r["flax"] == pytest.approx(r["ema"], rel=1e-5)  # flax's rule is the plain EMA
    assert r["debias_excess"] == pytest.approx(m**k / (1 - m**k))
    if "equinox" in r:
        # equinox 0.13 divides the stored average by 1 - m**k; jaxbn's drop-in does not.
        assert r["equinox"] == pytest.approx(r["ema"] / (1 - m**k), rel=1e-3)
        assert r["jaxbn.equinox"] == pytest.approx(r["ema"], rel=1e-3)


def test_figures_quick_writes_the_metadata(tmp_path):
    out = tmp_path / "f.json"
    cmd = [sys.executable, "-m", "benchmarks", "figures", "--quick", "--parts", "collectives", "--no-progress",
           "--out", str(out)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    fig = json.loads(out.read_text())
    meta = fig["meta"]
    assert meta["quick"] is True and meta["parts"] == ["collectives"]
    if os.path.isdir(os.path.join(ROOT, ".git")):  # a clone; the wheel legs run a copy of the suite outside git
        assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"]) and isinstance(meta["dirty"], bool)
    else:
        assert meta["commit"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", meta["date_utc"])
    for lib in ("jax", "jaxlib", "flax", "numpy"):
        assert meta["versions"][lib]
    assert {"equinox", "haiku"} <= set(meta["versions"])
    assert meta["machine"]["backend"] and meta["machine"]["device"]
    rows = {r["impl"]: r for r in fig["collectives"]["8"]}
    assert sum(rows["flax fast_var=True"]["counts"].values()) == 2  # flax: pmean of E[x] and E[x²]
    assert all(r["devices"] == 8 for r in rows.values())
    with pytest.raises(ValueError, match="unknown part"):
        figures.run(["bogus"])


def test_figures_refuses_to_render_a_quick_run(capsys):
    with pytest.raises(SystemExit) as e:
        figures.main(["--quick", "--render", "--parts", "claims"])
    assert e.value.code == 2 and "not from a --quick run" in capsys.readouterr().err


def test_parts_reprint_from_the_figures_file(quick, capsys):
    from benchmarks import report
    from benchmarks.__main__ import main

    main(["layer", "--from-json", QUICK, "--markdown"])
    assert capsys.readouterr().out.strip() == report.markdown_layer(quick["layer"]).strip()
    main(["model", "--from-json", QUICK, "--markdown"])
    assert capsys.readouterr().out.strip() == report.format_model(quick["model"], markdown=True).strip()


def test_state_claims():
    r = claims.state_claims()
    rng = np.random.default_rng(0)
    clean = [rng.normal(size=(32, 4)).astype(np.float32).astype(np.float64) for _ in range(2)]
    # jaxbn: the inf batch is skipped (var stays at its initial 1), the finite one is an EMA step at 0.9.
    assert r["jaxbn"]["inf_var"] == 1.0
    assert r["jaxbn"]["inf_then_clean_var"] == pytest.approx(0.9 + 0.1 * clean[1][:, 0].var(), rel=1e-5)
    assert r["jaxbn"]["bf16_state_dtype"] == r["jaxbn"]["bf16_strict"] == "float32"
    # flax has no guard: inf - inf in its moments makes the EMA NaN, and NaN stays NaN.
    assert math.isnan(r["flax"]["inf_var"]) and math.isnan(r["flax"]["inf_then_clean_var"])
    assert r["flax"]["bf16_state_dtype"] == "float32"  # force_float32_reductions
    if "haiku" in r:  # haiku keeps its statistics in the input's dtype
        assert r["haiku"]["bf16_state_dtype"] == "bfloat16"
