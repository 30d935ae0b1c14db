"""`python -m benchmarks reductions`: both ways give the float64 sums; kernels and passes as the docs explain."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import grid, hlo, reductions


@pytest.mark.parametrize("way", list(reductions.WAYS))
def test_both_ways_are_the_shifted_sums(way):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(8, 5, 5, 16)).astype(np.float32)
    k = np.full((1, 1, 1, 16), 2.5, np.float32)
    s1, s2 = jax.jit(reductions.WAYS[way], static_argnums=2)(jnp.asarray(x), jnp.asarray(k), (0, 1, 2))
    d = x.astype(np.float64) - k.astype(np.float64)
    np.testing.assert_allclose(np.asarray(s1), d.sum((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s2), (d * d).sum((0, 1, 2)), rtol=1e-5)


def test_the_variadic_reduction_reads_x_once():
    x = jnp.ones((32, 8, 8, 64), jnp.float32)
    k = jnp.zeros((1, 1, 1, 64), jnp.float32)
    counted = {}
    for way, fn in reductions.WAYS.items():
        compiled = jax.jit(fn, static_argnums=2).lower(x, k, (0, 1, 2)).compile()
        counted[way] = hlo.count_kernels(compiled.as_text()), hlo.bytes_accessed(compiled) / x.nbytes
    assert counted["one variadic reduction"][0] == 1
    assert counted["one variadic reduction"][1] < 1.1
    assert counted["two reductions"][1] > 1.9  # each reduction reads x


def test_measure_report():
    rep = reductions.measure([grid.parse_cases("nhwc", quick=True)[0]], reps=2)
    assert {r["way"] for r in rep["results"]} == set(reductions.WAYS)
    for r in rep["results"]:
        assert r["median_ms"] > 0 and r["kernels"] >= 1 and r["max_rel_diff"] < 1e-4
    assert "variadic" in reductions.format_report(rep)


def test_unknown_shape_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "reductions", "--shapes", "nope"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2 and "unknown --shapes" in out.stderr
