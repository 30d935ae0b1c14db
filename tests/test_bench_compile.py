"""`python -m benchmarks compile`: a tiny run's fields agree with each other and with the rendered block.

No timing is asserted: only how the figures relate (in context = total - identity, ratios = jaxbn / flax).
"""

import json

import pytest

from benchmarks import compile as compile_cost
from benchmarks import figures, render
from benchmarks.__main__ import main


@pytest.fixture(scope="module")
def rep():
    """ResNet-10 at width 8, batch 16, 1 round, one device, through the CLI (the pmap placement's collectives
    are counted in test_bench_model.py and test_sync_cost.py)."""
    out = main(["compile", "--quick", "--placements", "1dev", "--json"])
    return json.loads(json.dumps(out))


def test_rows_are_consistent(rep):
    by = {(r["model"], r["placement"], r["impl"]): r for r in rep["results"]}
    assert {(p, i) for _, p, i in by} == {("1dev", i) for i in compile_cost.IMPLS}
    for (name, placement, impl), r in by.items():
        ident, flax = by[(name, placement, "identity")], by[(name, placement, "flax")]
        for k in compile_cost.COSTS:
            assert r["in_context"][k] == pytest.approx(r[k] - ident[k])
            assert r["vs_flax"][k] == pytest.approx(r["in_context"][k] / flax["in_context"][k])
        assert r["hlo_lines"] > 0 and r["lower_s"] > 0 and r["compile_s"] > 0
        if impl == "jaxbn.linen":
            assert r["conditionals"] == 0
            assert r["in_context"]["hlo_lines"] > 0  # batch norm adds instructions
        assert r["collectives"] == 0  # one device


def test_layer_program_does_not_grow_with_features(rep):
    rows = {r["features"]: r for r in rep["layer"]}
    assert set(rows) == set(compile_cost.LAYER_FEATURES)
    small, large = (rows[c] for c in compile_cost.LAYER_FEATURES)
    assert small["jaxbn"] == large["jaxbn"] > 0 and small["flax"] == large["flax"] > 0


def test_the_rendered_block_shows_the_rows(rep):
    assert "compile" in figures.PARTS and "compile" in render.BLOCKS
    text = render.render_text("<!-- figures:compile -->\nold\n<!-- /figures:compile -->\n", {"compile": rep})
    lines = [ln for ln in text.splitlines() if ln.startswith("| resnet10")]
    by = {(r["placement"], r["impl"]): r for r in rep["results"]}
    assert len(lines) == 1
    for line in lines:
        placement = line.split(" | ")[1]
        f, j = by[(placement, "flax")], by[(placement, "jaxbn.linen")]
        assert f"{f['in_context']['compile_s']:.2f}, {j['vs_flax']['compile_s']:.2f}x" in line
        assert f"{f['in_context']['hlo_lines']}, {j['vs_flax']['hlo_lines']:.2f}x" in line
        assert line.endswith(f"| {j['conditionals']} | {f['collectives']} / {j['collectives']} |")
    assert f"64 features: {rep['layer'][0]['jaxbn']} / {rep['layer'][0]['flax']}" in text
