"""The layer benchmark (`python -m benchmarks layer`): report structure, figures known from hand-written programs."""

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import grid, layers, plot, report


@pytest.fixture(scope="module")
def saved():
    """The JSON report of a quick run (one tiny shape, both dtypes, every installed implementation), via the alias."""
    cmd = [sys.executable, "-m", "benchmarks", "layer", "--quick", "--shapes", "nhwc", "--json", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_report_keys(saved):
    assert {"meta", "config", "implementations", "skipped", "results", "summary", "collectives"} <= set(saved)
    assert {"date_utc", "command", "machine", "versions", "loadavg_start", "loadavg_end"} <= set(saved["meta"])
    assert saved["meta"]["versions"]["jax"]
    assert {"geomean_speedup_vs_flax", "residual_multiple", "targets", "bandwidth_gbs"} <= set(saved["summary"])


def test_every_implementation_row_present(saved):
    names = saved["implementations"]
    assert "jaxbn" in names and "flax" in names and "flax-exact" in names
    assert set(names) | set(saved["skipped"]) == set(layers.IMPLEMENTATIONS)
    got = {(r["case"], r["dtype"], r["mode"], r["impl"]) for r in saved["results"]}
    want = {("nhwc", d, m, n) for d in ("float32", "bfloat16") for m in layers.MODES for n in names}
    assert got == want
    for r in saved["results"]:
        assert r["median_ms"] > 0 and len(r["times_ms"]) == saved["config"]["reps"]
        for key in ("median_ms", "speedup_vs_flax", "vs_best_anchor"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert all(math.isfinite(t) and t > 0 for t in r["times_ms"])
        assert r["kernels"] >= 1 and r["bytes_accessed"] > 0 and r["temp_bytes"] >= 0
    for mode in layers.MODES:
        geo = saved["summary"]["geomean_speedup_vs_flax"][mode]
        assert set(geo) == {"float32", "bfloat16", "all"}
        assert math.isclose(geo["all"]["flax"], 1.0)


def test_limit_column(saved):
    """limit = pass-model bytes / time / bandwidth of the run's copy probe, per row."""
    bandwidth = saved["summary"]["bandwidth_gbs"] * 1e9
    assert bandwidth > 0 and len(saved["bandwidth_gbs_per_rep"]) == 2 * saved["config"]["reps"]  # one per rep and dtype
    for r in saved["results"]:
        itemsize = {"float32": 4, "bfloat16": 2}[r["dtype"]]
        assert r["min_bytes"] == {"train": 3, "train+grad": 8, "infer": 2}[r["mode"]] * math.prod(r["shape"]) * itemsize
        assert math.isclose(r["limit_fraction"], r["min_bytes"] / (r["median_ms"] * 1e-3) / bandwidth)


def test_full_size_passes_are_at_least_the_pass_model(saved):
    """No program moves less than the pass model says a batch norm must (the HLO counter is not undercounting)."""
    for r in saved["results"]:
        assert r["full_size_passes"] >= {"train": 2, "train+grad": 5, "infer": 2}[r["mode"]], r


def test_xla_passes_column(saved):
    """train+grad rows carry XLA's bytes accessed in passes over x, shown in the train+grad table as jaxbn / flax."""
    index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in saved["results"]}
    md = report.markdown_layer(saved).split("**train+grad**")[1].split("\n\n")[1]
    assert "XLA passes over x: jaxbn / flax" in md
    for r in saved["results"]:
        itemsize = {"float32": 4, "bfloat16": 2}[r["dtype"]]
        assert math.isclose(r["bytes_passes"], r["bytes_accessed"] / (math.prod(r["shape"]) * itemsize))
        if r["mode"] == "train+grad":
            assert r["bytes_passes"] >= 5, r  # read x, write y; read dy and x, write dx
            flax = index[(r["case"], r["dtype"], r["mode"], "flax")]
            if r["impl"] == "jaxbn":
                row = next(line for line in md.splitlines() if f"| {r['dtype']} |" in line)
                assert row.endswith(f" {r['bytes_passes']:.2f} / {flax['bytes_passes']:.2f} |"), row


def test_residuals(saved):
    resid = saved["summary"]["residual_multiple"]
    assert set(resid["jaxbn"]) == {"float32", "bfloat16"}
    assert all(v <= 1.0 for v in resid["jaxbn"].values())
    assert resid["flax"]["float32"] >= 1.0  # flax keeps more than x


def test_collectives(saved):
    coll = saved["collectives"]
    assert "error" not in coll, coll.get("error")
    assert set(coll["counts"]) == set(saved["implementations"])
    for counts in coll["counts"].values():
        assert set(counts) >= {"all-reduce", "all-gather"}
        assert sum(counts.values()) >= 1  # a synchronized step communicates


def test_table_and_plot(saved, tmp_path):
    text = report.format_layer(saved)
    for name in saved["implementations"]:
        assert name in text
    assert "geomean speedup" in text and "collectives" in text
    md = report.markdown_layer(saved)
    assert "limit" not in md and "bandwidth" not in md  # no roofline column: dropped, it mixed cache levels
    assert md.count("| geomean |") == 3 * len(layers.MODES) and "**Residuals**" in md and "**HLO**" in md
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    plot.plot_layer(saved, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_from_json_reprints(saved, tmp_path, capsys):
    from benchmarks.__main__ import main

    path = tmp_path / "bench.json"
    path.write_text(json.dumps(saved))
    main(["layer", "--from-json", str(path), "--markdown"])
    assert capsys.readouterr().out.strip() == report.markdown_layer(saved).strip()


def test_parse_shapes():
    assert [c.key for c in grid.parse_cases(None, quick=False)] == [c.key for c in grid.GRID]
    (case,) = grid.parse_cases("16x8x8x32@-1", quick=False)
    assert case.shape == (16, 8, 8, 32) and case.axis == -1 and case.layout == "NHWC"
    with pytest.raises(ValueError, match="bad shape 'huge'"):
        grid.parse_cases("huge", quick=False)


def test_unknown_implementation():
    with pytest.raises(ValueError, match="unknown implementation 'torch'"):
        layers.available(["jaxbn", "torch"])


def test_flax_collective_counts_in_the_layer_report(saved):
    """flax.linen.BatchNorm synchronizes with lax.pmean: with fast variance one pmean of (E[x], E[x²]) forward and
    its transpose backward (2); without, E[x] then E[(x - mean)²], each with its transpose (4)."""
    counts = saved["collectives"]["counts"]
    assert sum(counts["flax"].values()) == counts["flax"]["all-reduce"] == 2
    assert sum(counts["flax-exact"].values()) == counts["flax-exact"]["all-reduce"] == 4
    # jaxbn: one all-reduce of the moments forward and one of the two backward sums, in the whole program.
    assert sum(counts["jaxbn"].values()) == counts["jaxbn"]["all-reduce"] == 2


def test_geomean_spread():
    """report.geomean_spread on hand-made rows: per-row median ratios and per-round geomeans."""
    def row(case, impl, times):
        return {"case": case, "dtype": "float32", "mode": "train", "impl": impl, "times_ms": times,
                "median_ms": sorted(times)[len(times) // 2]}  # fmt: skip

    rows = [row("a", "flax", [2.0, 2.0, 2.0]), row("a", "x", [1.0, 2.0, 4.0]),
            row("b", "flax", [8.0, 8.0, 8.0]), row("b", "x", [4.0, 8.0, 2.0])]  # fmt: skip
    geo, lo, hi = report.geomean_spread({"results": rows}, "train", "float32", "x")
    assert geo == pytest.approx(math.sqrt((2 / 2) * (8 / 4)))  # medians: a 2 vs 2, b 8 vs 4
    per_round = [math.sqrt(2 / 1 * 8 / 4), math.sqrt(2 / 2 * 8 / 8), math.sqrt(2 / 4 * 8 / 2)]  # 2, 1, 1
    assert (lo, hi) == pytest.approx(tuple(np.percentile(per_round, [25, 75])))
    assert report.geomean_spread({"results": rows}, "infer", "float32", "x") is None


@pytest.mark.parametrize(
    "fn, big",
    [
        (lambda x, s: x * s, 1),  # d/dscale needs x
        (lambda x, s: jnp.exp(x) * s, 1),  # exp's derivative is its output, also what d/dscale needs
        (lambda x, s: jnp.sin(x) * s, 2),  # cos(x) for sin's derivative, sin(x) for d/dscale
    ],
)
def test_residual_bytes_of_hand_written_layers(fn, big):
    x = jnp.ones((16, 4), jnp.float32)
    layer = layers.Layer({"scale": jnp.ones((1, 4))}, None, lambda p, s, x, training: (fn(x, p["scale"]), s))
    got_big, small = layers.residual_bytes(layer, x, 4)
    assert got_big == big * x.nbytes and small <= 2 * 4 * 4
