"""Smoke test of `python -m jaxbn.benchmark --quick`: structure only, never timings."""

import json
import math
import subprocess
import sys

import pytest

from jaxbn import benchmark


@pytest.fixture(scope="module")
def report():
    """The JSON report of a quick run (one tiny shape, both dtypes, every installed implementation)."""
    cmd = [sys.executable, "-m", "jaxbn.benchmark", "--quick", "--shapes", "nhwc", "--json", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_report_keys(report):
    assert {"meta", "config", "implementations", "skipped", "results", "summary", "collectives"} <= set(report)
    assert {"date_utc", "command", "machine", "versions"} <= set(report["meta"])
    assert report["meta"]["versions"]["jax"]
    assert {"geomean_speedup_vs_flax", "residual_multiple", "targets"} <= set(report["summary"])


def test_every_implementation_row_present(report):
    names = report["implementations"]
    assert "jaxbn" in names and "flax" in names and "flax-exact" in names
    assert set(names) | set(report["skipped"]) == set(benchmark.IMPLEMENTATIONS)
    got = {(r["case"], r["dtype"], r["mode"], r["impl"]) for r in report["results"]}
    want = {("nhwc", d, m, n) for d in ("float32", "bfloat16") for m in benchmark.MODES for n in names}
    assert got == want
    for r in report["results"]:
        assert r["median_ms"] > 0 and len(r["times_ms"]) == report["config"]["reps"]
        assert r["speedup_vs_flax"] > 0 and r["vs_best_anchor"] > 0
    for mode in benchmark.MODES:
        geo = report["summary"]["geomean_speedup_vs_flax"][mode]
        assert set(geo) == {"float32", "bfloat16", "all"}
        assert math.isclose(geo["all"]["flax"], 1.0)


def test_residuals(report):
    resid = report["summary"]["residual_multiple"]
    assert set(resid["jaxbn"]) == {"float32", "bfloat16"}
    assert all(v <= 1.0 for v in resid["jaxbn"].values())
    assert resid["flax"]["float32"] >= 1.0  # flax keeps more than x


def test_collectives(report):
    coll = report["collectives"]
    assert "error" not in coll, coll.get("error")
    assert set(coll["counts"]) == set(report["implementations"])
    for counts in coll["counts"].values():
        assert set(counts) >= {"all-reduce", "all-gather"}
        assert sum(counts.values()) >= 1  # a synchronized step communicates


def test_table_and_plot(report, tmp_path):
    text = benchmark.format_report(report)
    for name in report["implementations"]:
        assert name in text
    assert "geomean speedup" in text and "collectives" in text
    md = benchmark.format_markdown(report)
    assert md.count("| geomean |") == 3 * len(benchmark.MODES) and "**Residuals**" in md
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    benchmark.plot(report, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_parse_shapes():
    assert [c.key for c in benchmark._parse_cases(None, quick=False)] == [c.key for c in benchmark.GRID]
    (case,) = benchmark._parse_cases("16x8x8x32@-1", quick=False)
    assert case.shape == (16, 8, 8, 32) and case.axis == -1 and case.layout == "NHWC"
    with pytest.raises(ValueError, match="bad shape"):
        benchmark._parse_cases("huge", quick=False)
