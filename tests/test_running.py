"""init_stats and update_stats against numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from tests import reference as ref


def test_init_stats():
    s = jaxbn.init_stats((2, 3))
    assert s.mean.shape == s.var.shape == (2, 3)
    assert s.mean.dtype == s.var.dtype == jnp.float32 and s.count.dtype == jnp.int32
    np.testing.assert_array_equal(s.mean, 0.0)
    np.testing.assert_array_equal(s.var, 1.0)
    assert int(s.count) == 0


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.99, 1.0, None])
@pytest.mark.parametrize("unbiased", [False, True])
def test_update_matches_reference(maybe_jit, momentum, unbiased):
    rng = np.random.default_rng(0)
    stats = jaxbn.RunningStats(
        jnp.asarray(rng.normal(size=4), jnp.float32), jnp.asarray(rng.random(4) + 0.5, jnp.float32), jnp.array(3)
    )
    n = np.array([5.0, 1.0, 0.0, 100.0], np.float32)
    m = jaxbn.Moments(jnp.asarray(rng.normal(size=4), jnp.float32), jnp.asarray(rng.random(4), jnp.float32), n)
    new = maybe_jit(lambda s, m: jaxbn.update_stats(s, m, momentum=momentum, unbiased=unbiased))(stats, m)
    em, ev, ec = ref.update(stats.mean, stats.var, 3, np.asarray(m.mean), np.asarray(m.var), n, momentum, unbiased)
    np.testing.assert_allclose(new.mean, em, rtol=1e-6)
    np.testing.assert_allclose(new.var, ev, rtol=1e-6)
    assert int(new.count) == ec
    assert new.mean.dtype == jnp.float32 and new.count.dtype == jnp.int32
    # the fully masked feature (n == 0) keeps its old values
    assert new.mean[2] == stats.mean[2] and new.var[2] == stats.var[2]


def test_cumulative_average_is_plain_average():
    rng = np.random.default_rng(1)
    stats = jaxbn.init_stats(3)
    means, vars_ = rng.normal(size=(7, 3)), rng.random((7, 3))
    for mu, v in zip(means, vars_, strict=True):
        stats = jaxbn.update_stats(
            stats, jaxbn.Moments(jnp.asarray(mu), jnp.asarray(v), jnp.full(3, 10.0)), momentum=None
        )
    np.testing.assert_allclose(stats.mean, means.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, vars_.mean(0), rtol=1e-5)
    assert int(stats.count) == 7


def test_update_does_not_mutate_and_keeps_structure():
    stats = jaxbn.init_stats(2)
    before = jax.tree_util.tree_map(np.array, stats)
    m = jaxbn.Moments(jnp.ones(2), jnp.full(2, 4.0), jnp.full(2, 8.0))
    new = jax.jit(jaxbn.update_stats)(stats, m)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stats, before)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(stats)
    for a, b in zip(new, stats, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_update_is_traced_once_per_shape():
    calls = []

    @jax.jit
    def f(s, m):
        calls.append(1)
        return jaxbn.update_stats(s, m)

    m = jaxbn.Moments(jnp.ones(2), jnp.ones(2), jnp.full(2, 2.0))
    s = jaxbn.init_stats(2)
    for _ in range(3):
        s = f(s, m)
    assert len(calls) == 1
