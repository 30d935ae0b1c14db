"""The layer benchmark (`python -m benchmarks layer`): structure only."""

import json
import math
import subprocess
import sys

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
        assert r["speedup_vs_flax"] > 0 and r["vs_best_anchor"] > 0
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
    assert "geomean speedup" in text and "collectives" in text and "bandwidth" in text
    md = report.markdown_layer(saved)
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
