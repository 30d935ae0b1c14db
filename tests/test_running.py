"""init_stats and update_stats against numpy formulas."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --- Nothing poisons the running statistics (docs/contract.md, update_stats) --------------------------

_update_jit = jax.jit(jaxbn.update_stats, static_argnames=("momentum", "unbiased"))


@settings(max_examples=40, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["ok", "ok", "all_masked", "nan_some", "inf_all", "masked_some"]),
                   min_size=1, max_size=8),
    momentum=st.sampled_from([None, 0.0, 0.5, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sequence_with_bad_batches_matches_definition(kinds, momentum, seed):
    """Random sequences of good, all-masked, partly and wholly non-finite batches, against the definition.

    EMA: each contributing batch moves each contributing feature; momentum=None: the plain average
    of the batches that contributed. The count counts the calls in which some feature contributed.
    """
    rng = np.random.default_rng(seed)
    c = 3
    stats = jaxbn.init_stats(c)
    batches = []
    for kind in kinds:
        mean, var, n = rng.normal(size=c) * 3, rng.random(c) + 0.1, np.full(c, 16.0)
        if kind == "all_masked":
            n[:] = 0.0
            mean[:], var[:] = 0.0, 0.0  # what moments returns for a feature with no entry
        elif kind == "nan_some":
            mean[1] = np.nan
        elif kind == "inf_all":
            var[:] = np.inf
        elif kind == "masked_some":
            n[0], mean[0], var[0] = 0.0, 0.0, 0.0
        batches.append((mean, var, n))
        m = jaxbn.Moments(*(jnp.asarray(v, jnp.float32) for v in (mean, var, n)))
        stats = _update_jit(stats, m, momentum=momentum)
    assert np.all(np.isfinite(stats.mean)) and np.all(np.isfinite(stats.var))
    # The documented value, call by call: a feature that sits out a counted call keeps its value, and
    # its next update uses w = 1 / (count + 1) with the one shared count (update_stats' docstring).
    want_mean, want_var, want_count = np.zeros(c), np.ones(c), 0
    for mean, var, n in batches:
        want_mean, want_var, want_count = ref.update(want_mean, want_var, want_count, mean, var, n, momentum)
    np.testing.assert_allclose(stats.mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, want_var, rtol=1e-5, atol=1e-6)
    assert int(stats.count) == want_count
    if momentum is None and not any(k in ("nan_some", "masked_some") for k in kinds):
        # every feature contributed to every counted call: the plain average of those batches
        avg_mean, avg_var, avg_count = ref.cumulative_average(*zip(*batches, strict=True))
        np.testing.assert_allclose(stats.mean, avg_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var, avg_var, rtol=1e-5, atol=1e-6)
        assert int(stats.count) == avg_count


def test_cumulative_average_skips_an_all_masked_batch():
    """Batch A mean 1, an all-masked batch, batch B mean 5: the average is 3 (0.1.0 gave 2.33)."""
    x_a = jnp.array([[0.0], [2.0]])
    x_b = jnp.array([[4.0], [6.0]])
    stats = jaxbn.init_stats(1)
    _, stats = jaxbn.batch_norm(x_a, stats, training=True, momentum=None)
    _, stats = jaxbn.batch_norm(x_a, stats, training=True, momentum=None, mask=jnp.zeros((2, 1), bool))
    assert int(stats.count) == 1
    _, stats = jaxbn.batch_norm(x_b, stats, training=True, momentum=None)
    np.testing.assert_allclose(stats.mean, [3.0])
    np.testing.assert_allclose(stats.var, [1.0])
    assert int(stats.count) == 2


@pytest.mark.parametrize("renorm", [False, True])
def test_non_finite_batch_keeps_running_stats(renorm):
    """inf in one feature, NaN in another: those features keep their stats, the third updates."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    x[4, 0] = np.inf
    x[7, 1] = np.nan
    stats = jaxbn.RunningStats(jnp.array([0.5, -0.5, 0.25]), jnp.array([2.0, 3.0, 4.0]), jnp.array(5))
    fn = jaxbn.batch_renorm if renorm else jaxbn.batch_norm
    _, new = jax.jit(lambda x, s: fn(x, s, training=True, momentum=0.9))(x, stats)
    mean, var, n = ref.moments(x[:, 2:], -1)
    np.testing.assert_array_equal(new.mean[:2], stats.mean[:2])
    np.testing.assert_array_equal(new.var[:2], stats.var[:2])
    np.testing.assert_allclose(new.mean[2], 0.9 * 0.25 + 0.1 * mean[0], rtol=1e-5)
    np.testing.assert_allclose(new.var[2], 0.9 * 4.0 + 0.1 * var[0], rtol=1e-5)
    assert int(new.count) == 6
    x_all = np.full((16, 3), np.nan, np.float32)
    _, same = jaxbn.batch_norm(x_all, stats, training=True, momentum=None)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, stats)  # a no-op, count included


def test_nan_in_masked_entries_changes_nothing():
    """NaN/inf only where the mask is False: output and stats equal those of the clean batch."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 2)).astype(np.float32)
    mask = np.ones((12, 1), bool)
    mask[[2, 9]] = False
    dirty = x.copy()
    dirty[2] = np.nan
    dirty[9, 1] = -np.inf
    stats = jaxbn.init_stats(2)
    y_clean, s_clean = jaxbn.batch_norm(x, stats, training=True, mask=mask)
    y_dirty, s_dirty = jaxbn.batch_norm(dirty, stats, training=True, mask=mask)
    jax.tree_util.tree_map(np.testing.assert_array_equal, s_dirty, s_clean)
    valid = mask[:, 0]
    np.testing.assert_array_equal(np.asarray(y_dirty)[valid], np.asarray(y_clean)[valid])
    mean, var, _ = ref.moments(x, -1, mask)
    np.testing.assert_allclose(np.asarray(y_clean)[valid], ref.normalize(x, mean, var)[valid], rtol=1e-4, atol=1e-5)


def test_low_precision_state_keeps_its_dtype():
    """A state the user cast to bf16 stays bf16; the arithmetic is float32 (strict promotion safe)."""
    stats = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if a.ndim else a, jaxbn.init_stats(2))
    m = jaxbn.Moments(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]), jnp.array([8.0, 8.0]))
    with jax.numpy_dtype_promotion("strict"), pytest.warns(UserWarning, match="stored in bfloat16 .* stop moving"):
        new = jaxbn.update_stats(stats, m, momentum=0.5)
    assert new.mean.dtype == new.var.dtype == jnp.bfloat16 and new.count.dtype == jnp.int32
    np.testing.assert_allclose(new.mean.astype(np.float32), [0.5, 1.0])
    np.testing.assert_allclose(new.var.astype(np.float32), [2.0, 2.5])


# --- Precision at any magnitude, float64 states, narrow states ------------------------------------


def _data_moments(seed, std, shift=0.0, n=64, c=3):
    """Batch data with the given spread, its float32 jaxbn moments and its float64 reference moments."""
    x = (shift + std * np.random.default_rng(seed).normal(size=(n, c))).astype(np.float32)
    mean, var, cnt = ref.moments(x, -1)
    return x, (mean, var, cnt)


@pytest.mark.parametrize("std", [1e-4, 1e-3, 1e4])
@pytest.mark.parametrize("momentum", [None, 0.9, 0.99])
def test_running_var_keeps_relative_precision(momentum, std):
    """var 1e-8 and 1e8 data through batch_norm: the running stats within float32 rounding of float64.

    `old + (batch - old) * w` from old = 1 stored 0.0 for a var of 1e-8 (momentum=None) and was 2.3%
    off at std 1e-3; the convex form keeps relative precision.
    """
    stats, want = jaxbn.init_stats(3), (np.zeros(3), np.ones(3), 0)
    step = jax.jit(lambda x, s: jaxbn.batch_norm(x, s, training=True, momentum=momentum)[1])
    for seed in range(30):
        x, (mean, var, n) = _data_moments(seed, std, shift=std)
        stats = step(x, stats)
        want = ref.update(*want, mean, var, n, momentum)
    np.testing.assert_allclose(stats.var, want[1], rtol=2e-5)
    np.testing.assert_allclose(stats.mean, want[0], rtol=2e-5, atol=1e-5 * std)
    assert int(stats.count) == want[2]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_float64_state_is_updated_in_float64(x64, momentum):
    """With jax x64 a float64 state stays float64 and is exact to float64 rounding (was 2-5e-8 off)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 3)) * 3.0 + 1.0
    mean, var, n = ref.moments(x, -1)
    stats = jaxbn.init_stats(3, jnp.float64)
    new = jaxbn.update_stats(stats, jaxbn.moments(jnp.asarray(x)), momentum=momentum)
    _, via_bn = jaxbn.batch_norm(jnp.asarray(x), stats, training=True, momentum=momentum)
    # float32 moments into a float64 state: still combined in float64
    from32 = jaxbn.update_stats(stats, jaxbn.moments(jnp.asarray(x, jnp.float32)), momentum=momentum)
    want_mean, want_var, _ = ref.update(np.zeros(3), np.ones(3), 0, mean, var, n, momentum)
    for got in (new, via_bn):
        assert got.mean.dtype == got.var.dtype == jnp.float64
        np.testing.assert_allclose(got.mean, want_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got.var, want_var, rtol=1e-12)
    assert from32.var.dtype == jnp.float64
    m32 = jaxbn.moments(jnp.asarray(x, jnp.float32))
    w = 1.0 if momentum is None else 0.1
    np.testing.assert_allclose(from32.var, (1 - w) * 1.0 + w * np.asarray(m32.var, np.float64), rtol=1e-12)


def test_narrow_state_warns_where_created_and_updated():
    """bf16/fp16 states stop moving (1.0 toward 1.3 at 0.99 never moves): init_stats and update_stats warn."""
    for dt in (jnp.bfloat16, jnp.float16):
        with pytest.warns(UserWarning, match=f"stored in {np.dtype(dt).name} .* stop moving"):
            stats = jaxbn.init_stats(2, dt)
        m = jaxbn.Moments(jnp.full(2, 1.3), jnp.ones(2), jnp.full(2, 8.0))
        stats = stats._replace(mean=jnp.ones(2, dt))
        with pytest.warns(UserWarning, match=r"momentum=0.99 a batch within \d+% of the running value"):
            new = jaxbn.update_stats(stats, m, momentum=0.99)
        if dt == jnp.bfloat16:  # the documented stall: the step 0.003 is below half a bf16 ulp at 1.0
            np.testing.assert_array_equal(np.asarray(new.mean, np.float32), 1.0)


_STATE_DTYPES = ["float32", "float64", "bfloat16", "float16"]


@settings(max_examples=30, deadline=None)
@given(
    log_std=st.floats(-4.0, 4.0),
    momentum=st.sampled_from([None, 0.0, 0.5, 0.9, 0.99]),
    dtype=st.sampled_from(_STATE_DTYPES),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_update_rules_any_magnitude_and_state_dtype(log_std, momentum, dtype, steps, seed):
    """Tiny and huge variances, both rules, float64 (x64) and float16/bfloat16 states, against float64.

    Each call equals the float64 update of the state it was given, rounded once to the state's dtype
    (to float32 rounding of the arithmetic): so a narrow state is exact to its own ulp per call, and
    float32/float64 states keep relative precision over the whole sequence.
    """
    std = 10.0 ** (min(max(log_std, -1.0), 1.5) if dtype == "float16" else log_std)  # float16: var in its normal range
    rng = np.random.default_rng(seed)
    dt = np.dtype(jnp.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    with jax.enable_x64(dtype == "float64"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if dt.itemsize == 2 else "error")
            stats = jaxbn.init_stats(3, dt)
            whole = (np.zeros(3), np.ones(3), 0)
            for _ in range(steps):
                mean, var = rng.normal(size=3) * std, (rng.random(3) + 0.01) * std**2
                n = np.full(3, 10.0)
                m = jaxbn.Moments(*(jnp.asarray(v, dt if dtype == "float64" else np.float32) for v in (mean, var, n)))
                m_used = [np.asarray(v, np.float64) for v in m]
                one = ref.update(np.asarray(stats.mean, np.float64), np.asarray(stats.var, np.float64),
                                 int(stats.count), *m_used, momentum)
                whole = ref.update(*whole, *m_used, momentum)
                stats = jaxbn.update_stats(stats, m, momentum=momentum)
                assert stats.mean.dtype == stats.var.dtype == dt
                ulp = float(jnp.finfo(dt).eps) if dt.itemsize == 2 else 4e-7 if dt == np.float32 else 1e-15
                for got, want in ((stats.mean, one[0]), (stats.var, one[1])):
                    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=ulp,
                                               atol=ulp * (std if got is stats.mean else std**2))
            if dt.itemsize >= 4:
                rtol = 2e-6 * steps if dt == np.float32 else 1e-13
                np.testing.assert_allclose(np.asarray(stats.var, np.float64), whole[1], rtol=rtol)
                np.testing.assert_allclose(np.asarray(stats.mean, np.float64), whole[0], rtol=rtol, atol=rtol * std)
