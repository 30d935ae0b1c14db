"""jaxbn.haiku.BatchNorm: a drop-in for haiku.BatchNorm.

* Parity with hk.BatchNorm where haiku is right: outputs, moving averages,
  gradients w.r.t. inputs and parameters over several steps, channels_last /
  channels_first / axis=, test_local_stats, scale/offset passed at call time,
  integer inputs, one value per feature; checkpoints load both ways.
* Sync: cross_replica_axis under vmap, 8-device pmap and shard_map against
  the float64 result on the whole batch; index groups under pmap; uneven
  masks weighted by their counts.
* Fixed faults against float64 numpy references, with haiku's wrong value
  next to ours: large-offset variance, bf16 statistics.
* Reliability: non-finite or fully masked batches leave the averages alone.
* Every error. The module runs with dtype promotion "strict" (haiku's own
  arithmetic is run under "standard" where it needs it).
"""

from __future__ import annotations

import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn.haiku
from tests import reference as ref

DECAY = 0.9
MEAN, VAR = "batch_norm/~/mean_ema", "batch_norm/~/var_ema"


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def standard(fn):
    """Runs `fn` (a haiku.BatchNorm computation) under haiku's test settings: standard dtype
    promotion, rank promotion allowed (haiku's call-time scale of shape (C,) needs it)."""

    def wrapped(*args, **kwargs):
        with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
            return fn(*args, **kwargs)

    return wrapped


def transformed(cls, **options):
    """hk.transform_with_state of one BatchNorm layer; call kwargs go to the layer."""
    kw = {"create_scale": True, "create_offset": True, "decay_rate": DECAY, **options}

    def f(x, is_training, *args, **call):
        return cls(**kw)(x, is_training, *args, **call)

    return hk.transform_with_state(f)


def debiased_ema(values, valid=None, initial=None):
    """haiku's zero-debiased EMA from its definition, float64, with jaxbn's documented rule for skips.

    Over the k batches with at least one valid entry (the counter), with d the decay::

        average = sum_j (1 - d) d^(k - j) u_j / (1 - d^k),   hidden = sum_j (1 - d) d^(k - j) u_j

    where u_j is the entry's batch value when valid; a skipped step holds the entry's average as it
    stood before that step, and steps before the entry's first valid batch hold that batch. An entry
    never valid keeps `initial` (hidden 0). Returns (k, hidden, average).
    """
    shape = np.shape(values[0])
    initial = np.zeros(shape) if initial is None else np.asarray(initial, np.float64).reshape(shape)
    filled = []  # per counted step: (value or None where the entry has had no valid batch yet)
    seen = np.zeros(shape, bool)
    average = initial.copy()
    for i, v in enumerate(values):
        ok = np.ones(shape, bool) if valid is None else np.asarray(valid[i], bool)
        if not ok.any():
            continue
        first = ok & ~seen
        filled = [np.where(first, v, u) for u in filled]  # back-fill before the first valid batch
        filled.append(np.where(ok, np.asarray(v, np.float64), average))
        seen |= ok
        k = len(filled)
        weights = [(1 - DECAY) * DECAY ** (k - 1 - j) for j in range(k)]
        hidden = sum(w * u for w, u in zip(weights, filled, strict=True))
        average = np.where(seen, hidden / (1 - DECAY**k), initial)
    k = len(filled)
    if not k:
        return 0, np.zeros(shape), initial
    return k, np.where(seen, average * (1 - DECAY**k), 0.0), average


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------- parity with haiku

LAYOUTS = {
    "channels_last": ({}, (6, 3, 3, 4), 3),
    "channels_first": ({"data_format": "channels_first"}, (6, 4, 3, 3), 1),
    "axis": ({"axis": [0, 2]}, (5, 3, 4), 1),
    "call_time_scale": ({"create_scale": False, "create_offset": False}, (8, 5), 1),
}


def _run(cls, options, batches, dy, call):
    """init, then a training step per batch with gradients; eval and test_local_stats at the end."""
    f = transformed(cls, **options)
    params, state = f.init(None, batches[0], True, **call)

    @jax.jit
    def train(params, state, x, dy, call):
        def loss(params, x):
            y, new_state = f.apply(params, state, None, x, True, **call)
            return jnp.sum(y * dy), (y, new_state)

        (_, (y, new_state)), (dparams, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, new_state, dparams, dx

    steps = []
    for x in batches:
        y, state, dparams, dx = train(params, state, x, dy, call)
        steps.append((y, dparams, dx))
    y_eval, _ = f.apply(params, state, None, batches[0], False, **call)
    y_local, state_after = f.apply(params, state, None, batches[0], False, True, **call)
    return params, state, steps, y_eval, y_local, state_after


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_haiku_over_steps(layout):
    options, shape, feature_axis = LAYOUTS[layout]
    batches = [(1.5 + 2.0 * ref.normal(i, shape)) for i in range(3)]
    dy = ref.normal(9, shape)
    c = shape[feature_axis]
    call = {}
    if layout == "call_time_scale":
        call = {"scale": 1 + 0.3 * ref.normal(10, (c,)), "offset": ref.normal(11, (c,))}
    ours = _run(jaxbn.haiku.BatchNorm, options, batches, dy, call)
    theirs = standard(_run)(hk.BatchNorm, options, batches, dy, call)
    params, state, steps, y_eval, y_local, state_after = ours
    h_params, h_state, h_steps, h_y_eval, h_y_local, h_state_after = theirs
    assert jax.tree.structure((params, state)) == jax.tree.structure((h_params, h_state))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), (params, state)) == jax.tree.map(
        lambda a: (a.shape, a.dtype), (h_params, h_state)
    )
    ours_values, haiku_values = (steps, state, y_eval, y_local), (h_steps, h_state, h_y_eval, h_y_local)
    jax.tree.map(lambda a, b: close(a, b, 2e-5), ours_values, haiku_values)
    jax.tree.map(np.testing.assert_array_equal, state_after, state)  # test_local_stats updates nothing
    # And both against the float64 definition: the EMA of the batch moments, and the outputs.
    feat = feature_axis
    stats = [ref.moments(x, feat) for x in batches]
    k, _, mean_avg = debiased_ema([m for m, _, _ in stats])
    _, _, var_avg = debiased_ema([v for _, v, _ in stats])
    assert int(state[MEAN]["counter"]) == k == 3
    close(state[MEAN]["average"].reshape(-1), mean_avg, 1e-5)
    close(state[VAR]["average"].reshape(-1), var_avg, 1e-5)
    scale = call.get("scale", np.ones(c))
    offset = call.get("offset", np.zeros(c))
    close(steps[-1][0], ref.normalize(batches[-1], *stats[-1][:2], scale, offset, axis=feat), 1e-4)
    dx, dscale, doffset = ref.bn_train_grads(batches[-1], dy, scale, axis=feat)
    close(steps[-1][2], dx, 1e-4)
    if "batch_norm" in steps[-1][1]:
        close(steps[-1][1]["batch_norm"]["scale"].reshape(-1), dscale, 1e-4)
        close(steps[-1][1]["batch_norm"]["offset"].reshape(-1), doffset, 1e-4)
    close(y_eval, ref.normalize(batches[0], mean_avg, var_avg, scale, offset, axis=feat), 1e-4)


def test_init_state_and_inference_right_after_init_as_haiku():
    """haiku's init returns counter 0, hidden 0 and average = the init batch's statistics."""
    x = 2.0 + ref.normal(16, (8, 3))
    f_ours, f_hk = transformed(jaxbn.haiku.BatchNorm), transformed(hk.BatchNorm)
    p, s = f_ours.init(None, x, True)
    hp, hs = standard(f_hk.init)(None, x, True)
    jax.tree.map(lambda a, b: close(a, b, 1e-5), s, hs)
    mean, var, _ = ref.moments(x)
    assert int(s[MEAN]["counter"]) == 0 and not np.asarray(s[VAR]["hidden"]).any()
    close(s[MEAN]["average"].reshape(-1), mean, 1e-5)
    close(s[VAR]["average"].reshape(-1), var, 1e-5)
    close(f_ours.apply(p, s, None, x, False)[0], standard(f_hk.apply)(hp, hs, None, x, False)[0], 1e-5)
    # A feature with no valid entry at init starts at mean 0, var 1 (haiku has no masks).
    _, s = f_ours.init(None, x, True, mask=np.array([[True, False, True]]))
    np.testing.assert_array_equal(np.asarray(s[MEAN]["average"]).ravel()[1], 0.0)
    np.testing.assert_array_equal(np.asarray(s[VAR]["average"]).ravel()[1], 1.0)
    close(s[VAR]["average"].reshape(-1)[::2], var[::2], 1e-5)
    # Inference in init, before any state exists, fails as haiku's does.
    for init in (f_ours.init, standard(f_hk.init)):
        with pytest.raises(ValueError, match="No value for 'average'"):
            init(None, x, False)


def test_integer_input_and_one_value_per_feature_as_haiku():
    x_int = np.arange(24, dtype=np.int32).reshape(6, 4) % 7
    x_one = ref.normal(0, (1, 4))
    for x in (x_int, x_one):
        f_ours, f_hk = transformed(jaxbn.haiku.BatchNorm), transformed(hk.BatchNorm)
        p, s = f_ours.init(None, x, True)
        hp, hs = standard(f_hk.init)(None, x, True)
        assert jax.tree.map(lambda a: a.dtype, p) == jax.tree.map(lambda a: a.dtype, hp)  # int32 params for int input
        y, s = f_ours.apply(p, s, None, x, True)
        hy, hs = standard(f_hk.apply)(hp, hs, None, x, True)
        assert y.dtype == hy.dtype == jnp.float32
        close(y, hy, 1e-5)
        jax.tree.map(lambda a, b: close(a, b, 1e-5), s, hs)
    np.testing.assert_array_equal(y, np.zeros((1, 4)))  # one value per feature: x - mean = 0, as haiku


def test_scalar_input_and_every_axis_reduced():
    """Haiku accepts a 0-d input (nothing reduced) and axis= naming every axis; so does jaxbn."""
    for x, options in ((np.float32(3.0), {}), (ref.normal(1, (5, 3)), {"axis": [0, 1]})):
        f_ours, f_hk = transformed(jaxbn.haiku.BatchNorm, **options), transformed(hk.BatchNorm, **options)
        p, s = f_ours.init(None, x, True)
        hp, hs = standard(f_hk.init)(None, x, True)
        y, s = f_ours.apply(p, s, None, x, True)
        hy, hs = standard(f_hk.apply)(hp, hs, None, x, True)
        close(y, hy, 1e-5)
        jax.tree.map(lambda a, b: close(a, b, 1e-5), s, hs)
    close(y, ref.normalize(x.reshape(-1, 1), *ref.moments(x.reshape(-1, 1))[:2]).reshape(x.shape), 1e-5)


def test_checkpoints_load_both_ways():
    x = 0.5 + ref.normal(3, (8, 2, 2, 3))
    f_ours, f_hk = transformed(jaxbn.haiku.BatchNorm), transformed(hk.BatchNorm)
    hp, hs = standard(f_hk.init)(None, x, True)
    _, hs = standard(f_hk.apply)(hp, hs, None, x, True)
    hy, _ = standard(f_hk.apply)(hp, hs, None, x, False)
    y, _ = f_ours.apply(hp, hs, None, x, False)  # haiku's checkpoint in jaxbn
    close(y, hy, 1e-5)
    p, s = f_ours.init(None, x, True)
    _, s = f_ours.apply(p, s, None, x, True)
    hy2, hs2 = standard(f_hk.apply)(p, s, None, x, True)  # jaxbn's checkpoint in haiku, training on
    y2, s2 = f_ours.apply(p, s, None, x, True)
    close(y2, hy2, 1e-5)
    jax.tree.map(lambda a, b: close(a, b, 1e-5), s2, hs2)


def test_jit_and_eager_agree():
    x, mask = 1.0 + ref.normal(14, (6, 2, 3)), ref.bernoulli(15, 0.7, (6, 2, 1))
    f = transformed(jaxbn.haiku.BatchNorm)
    params, state = f.init(None, x, True)
    eager = f.apply(params, state, None, x, True, mask=mask)
    jitted = jax.jit(f.apply, static_argnums=4)(params, state, None, x, True, mask=mask)
    jax.tree.map(lambda a, b: close(a, b, 1e-6), eager, jitted)
    # both are the float64 values: the masked batch moments, and the first debiased update is those moments
    mean, var, _ = ref.moments(x, mask=mask)
    for y, s in (eager, jitted):
        close(y, ref.normalize(x, mean, var), 1e-4)
        close(s[MEAN]["average"].reshape(-1), mean, 1e-5)
        close(s[VAR]["average"].reshape(-1), var, 1e-5)
        close(s[VAR]["hidden"].reshape(-1), (1 - DECAY) * var, 1e-5)
        assert int(s[MEAN]["counter"]) == 1


# ---------------------------------------------------------------- fixed faults (float64 references)


def test_large_offset_variance_is_stable_where_haiku_goes_negative():
    x = (1e4 + ref.normal(4, (64, 4))).astype(np.float32)
    true_mean, true_var, _ = ref.moments(x)
    f_ours, f_hk = transformed(jaxbn.haiku.BatchNorm), transformed(hk.BatchNorm)
    p, s = f_ours.init(None, x, True)
    y, s = f_ours.apply(p, s, None, x, True)
    hy, hs = standard(f_hk.apply)(*standard(f_hk.init)(None, x, True), None, x, True)
    ours_var = np.asarray(s[VAR]["average"]).reshape(-1)
    haiku_var = np.asarray(hs[VAR]["average"]).reshape(-1)
    # Side by side: haiku's E[x^2] - E[x]^2 in float32 is off by O(10) (negative for some features: NaN outputs).
    assert np.max(np.abs(haiku_var - true_var) / true_var) > 1.0, haiku_var
    np.testing.assert_allclose(ours_var, true_var, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref.normalize(x, true_mean, true_var), atol=2e-3)
    assert np.isfinite(np.asarray(y)).all()


def test_large_offset_haiku_var_is_negative_and_outputs_nan():
    """The fault in the issue: float32 1e4 + N(0, 1) gives haiku a negative variance and NaN outputs."""
    x = (1e4 + ref.normal(4, (64, 4))).astype(np.float32)
    f_hk = transformed(hk.BatchNorm)
    hy, hs = standard(f_hk.apply)(*standard(f_hk.init)(None, x, True), None, x, True)
    neg = np.asarray(hs[VAR]["average"]).reshape(-1) < 0
    assert neg.any() and np.isnan(np.asarray(hy)[:, neg]).all()
    f_ours = transformed(jaxbn.haiku.BatchNorm)
    y, s = f_ours.apply(*f_ours.init(None, x, True), None, x, True)
    assert (np.asarray(s[VAR]["average"]) > 0).all() and np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_statistics_are_float32(dtype):
    x = (100.0 + 3.0 * ref.normal(5, (256, 4))).astype(dtype)
    true_mean, true_var, _ = ref.moments(np.asarray(x, np.float64))
    f_ours, f_hk = transformed(jaxbn.haiku.BatchNorm), transformed(hk.BatchNorm)
    p, s = f_ours.init(None, x, True)
    assert jax.tree.map(lambda a: a.dtype, p)["batch_norm"] == {"scale": dtype, "offset": dtype}  # as haiku
    assert {s[k][n].dtype for k in (MEAN, VAR) for n in ("hidden", "average")} == {jnp.dtype(jnp.float32)}
    y, s = f_ours.apply(p, s, None, x, True)
    hy, hs = standard(f_hk.apply)(*standard(f_hk.init)(None, x, True), None, x, True)
    assert y.dtype == hy.dtype == dtype
    assert hs[VAR]["average"].dtype == dtype  # haiku keeps (and computes) the statistics in half precision
    ours_err = np.abs(np.asarray(s[VAR]["average"], np.float64).reshape(-1) / true_var - 1).max()
    haiku_err = np.abs(np.asarray(hs[VAR]["average"], np.float64).reshape(-1) / true_var - 1).max()
    assert ours_err < 1e-4 and haiku_err > 0.05, (ours_err, haiku_err)
    close(s[MEAN]["average"].reshape(-1), true_mean, 1e-5)


def test_update_keeps_the_dtype_of_the_state_it_was_given():
    x = ref.normal(6, (16, 3)).astype(jnp.bfloat16)
    f = transformed(jaxbn.haiku.BatchNorm)
    p, s = f.init(None, x, True)
    s_bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, s)
    with pytest.warns(UserWarning, match="stored in bfloat16 .* stop moving"):  # said loudly, as documented
        _, s2 = f.apply(p, s_bf16, None, x, True)
    assert jax.tree.map(lambda a: a.dtype, s2) == jax.tree.map(lambda a: a.dtype, s_bf16)
    y, _ = f.apply(p, s2, None, x, False)
    assert y.dtype == jnp.bfloat16


# ---------------------------------------------------------------- masks and reliability


def test_mask_against_float64_reference():
    x = 2.0 + ref.normal(7, (12, 5, 3))
    mask = ref.bernoulli(8, 0.6, (12, 5, 1))
    f = transformed(jaxbn.haiku.BatchNorm)
    p, s = f.init(None, x, True, mask=mask)
    y, s = f.apply(p, s, None, x, True, mask=mask)
    mean, var, _ = ref.moments(x, mask=mask)
    close(y, ref.normalize(x, mean, var), 1e-4)
    close(s[MEAN]["average"].reshape(-1), mean, 1e-5)
    close(s[VAR]["average"].reshape(-1), var, 1e-5)
    y_local, _ = f.apply(p, s, None, x, False, True, mask=mask)
    close(y_local, y, 1e-6)


def test_bad_batches_leave_the_averages_alone():
    x = 1.0 + ref.normal(9, (8, 3))
    f = transformed(jaxbn.haiku.BatchNorm)
    p, s0 = f.init(None, x, True)
    x_inf = x.copy()
    x_inf[2, 0] = np.inf  # feature 0 non-finite
    masked_feature = np.ones((1, 3), bool)
    masked_feature[0, 1] = False  # feature 1 entirely masked
    batches = [
        (x, None),
        (x_inf + 1.0, masked_feature),
        (np.full_like(x, np.nan), None),  # every feature non-finite: a no-op, counter included
        (x, np.zeros((8, 1), bool)),  # entirely masked: a no-op
        (2.0 * x, None),
    ]
    s = s0
    for xb, mb in batches:
        _, s = f.apply(p, s, None, xb, True, mask=mb)
    valid, means, variances = [], [], []
    for xb, mb in batches:
        with np.errstate(invalid="ignore"):
            m, v, n = ref.moments(xb, mask=mb)
        valid.append((n > 0) & np.isfinite(m) & np.isfinite(v))
        means.append(np.nan_to_num(m))
        variances.append(np.nan_to_num(v))
    k, mean_hidden, mean_avg = debiased_ema(means, valid)
    _, var_hidden, var_avg = debiased_ema(variances, valid)
    assert k == 3 and int(s[MEAN]["counter"]) == int(s[VAR]["counter"]) == 3
    for got, want in ((s[MEAN]["hidden"], mean_hidden), (s[MEAN]["average"], mean_avg),
                      (s[VAR]["hidden"], var_hidden), (s[VAR]["average"], var_avg)):
        close(got.reshape(-1), want, 1e-5)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(s))
    # haiku's invariant average = hidden / (1 - d^counter) holds after the skips: haiku trains on from it
    for name in (MEAN, VAR):
        close(s[name]["hidden"], np.asarray(s[name]["average"], np.float64) * (1 - DECAY**3), 1e-6)


@pytest.mark.parametrize("skip", ["inf", "mask"])
def test_a_channel_skipped_in_its_first_step_reads_its_own_statistics(skip):
    """Channel 0 skipped in step 1, valid in steps 2 and 3: its average is the debiased EMA of those
    two batches' values with the skipped step filled (no 50%-low mean, no inference std 1.41)."""
    rng = np.random.default_rng(21)
    xs = [4.5 + rng.normal(size=(16, 3)) * s for s in (1.0, 1.5, 2.0)]
    f = transformed(jaxbn.haiku.BatchNorm)
    first = xs[0].copy()
    mask = None
    if skip == "inf":
        first[3, 0] = np.inf
    else:
        mask = np.array([[False, True, True]])
    batches = [(first, mask), (xs[1], None), (xs[2], None)]
    p, s = f.init(None, xs[1], True)
    for xb, mb in batches:
        _, s = f.apply(p, s, None, xb, True, mask=mb)
    valid, means, variances = [], [], []
    for xb, mb in batches:
        m, v, n = ref.moments(xb, mask=mb)
        valid.append(ref.contributes(m, v, n))
        means.append(np.nan_to_num(m))
        variances.append(np.nan_to_num(v))
    for name, values in ((MEAN, means), (VAR, variances)):
        k, hidden, average = debiased_ema(values, valid)
        assert int(s[name]["counter"]) == k == 3
        close(s[name]["average"].reshape(-1), average, 1e-5)
        close(s[name]["hidden"].reshape(-1), hidden, 1e-5)


def test_channel_never_valid_keeps_the_identity_then_takes_its_first_batch():
    """A channel masked in the first two counted steps: inference is the identity for it (mean 0,
    var 1); its first valid batch is then its average exactly, as haiku's first update."""
    x = 3.0 + 2.0 * ref.normal(22, (8, 2))
    f = transformed(jaxbn.haiku.BatchNorm)
    only0 = np.array([[True, False]])
    p, s = f.init(None, x, True, mask=only0)
    for _ in range(2):
        _, s = f.apply(p, s, None, x, True, mask=only0)
    np.testing.assert_array_equal(np.asarray(s[MEAN]["average"]).ravel()[1], 0.0)
    np.testing.assert_array_equal(np.asarray(s[VAR]["average"]).ravel()[1], 1.0)
    y, _ = f.apply(p, s, None, x, False)
    close(y[:, 1], x[:, 1] / np.sqrt(1.0 + 1e-5), 1e-6)
    x2 = 1.0 + 0.5 * ref.normal(23, (8, 2))
    _, s = f.apply(p, s, None, x2, True)
    mean, var, _ = ref.moments(x2)
    close(np.asarray(s[MEAN]["average"]).ravel()[1], mean[1], 1e-6)
    close(np.asarray(s[VAR]["average"]).ravel()[1], var[1], 1e-6)
    assert int(s[MEAN]["counter"]) == 3


def test_x64_integer_input_follows_haikus_promotion():
    """Under jax x64, int64 input gives float64 output and statistics, as haiku's jnp.mean does."""
    with jax.enable_x64(True):
        x = (np.arange(48, dtype=np.int64).reshape(12, 4) * 7) % 11
        f_ours, f_hk = transformed(jaxbn.haiku.BatchNorm), transformed(hk.BatchNorm)
        p, s = f_ours.init(None, x, True)
        hp, hs = standard(f_hk.init)(None, x, True)
        y, s = f_ours.apply(p, s, None, x, True)
        hy, hs = standard(f_hk.apply)(hp, hs, None, x, True)
        assert y.dtype == hy.dtype == jnp.float64
        assert jax.tree.map(lambda a: a.dtype, s) == jax.tree.map(lambda a: a.dtype, hs)
        mean, var, _ = ref.moments(x)
        close(y, ref.normalize(x, mean, var), 1e-12)
        close(y, hy, 1e-10)
        close(s[VAR]["average"].reshape(-1), var, 1e-12)
        jax.tree.map(lambda a, b: close(a, b, 1e-10), s, hs)


# ---------------------------------------------------------------- cross-replica statistics

D, B, C = 8, 4, 3
VALID = np.array([4, 1, 3, 0, 2, 4, 1, 2])  # uneven valid entries per replica; replica 3 has none
X = (3.0 + 2.0 * ref.normal(12, (D, B, C))).astype(np.float32)
DY = ref.normal(13, (D, B, C))
MASK = np.arange(B)[None, :, None] < VALID[:, None, None]

needs_8 = pytest.mark.usefixtures("eight_devices")  # fewer devices: a failure saying why, never a skip


def _replica_step(map_fn, masked, **options):
    """One training step of one replica under `map_fn` (axis name "i"): y, state, dx."""
    f = transformed(jaxbn.haiku.BatchNorm, cross_replica_axis="i", create_scale=False, create_offset=False, **options)

    def step(x, dy, mask):
        params, state = f.init(None, x, True, mask=mask if masked else None)

        def loss(x):
            y, new_state = f.apply(params, state, None, x, True, mask=mask if masked else None)
            return jnp.sum(y * dy), (y, new_state)

        (_, (y, new_state)), dx = jax.value_and_grad(loss, has_aux=True)(x)
        return y, new_state, dx

    return map_fn(step)


def _check_whole_batch(y, state, dx, masked):
    xf, dyf, mf = X.reshape(-1, C), DY.reshape(-1, C), MASK.reshape(-1, 1) if masked else None
    mean, var, _ = ref.moments(xf, mask=mf)
    close(np.asarray(y).reshape(-1, C), ref.normalize(xf, mean, var), 1e-4)
    close(np.asarray(dx).reshape(-1, C), ref.bn_train_grads(xf, dyf, None, mask=mf)[0], 1e-4)
    for r in range(D):  # every replica holds the whole batch's statistics
        close(np.asarray(state[MEAN]["average"][r]).reshape(-1), mean, 1e-5)
        close(np.asarray(state[VAR]["average"][r]).reshape(-1), var, 1e-5)
    return mean


@pytest.mark.parametrize("masked", [False, True], ids=["full", "uneven_masks"])
def test_cross_replica_under_vmap_matches_the_whole_batch(masked):
    y, state, dx = _replica_step(lambda g: jax.jit(jax.vmap(g, axis_name="i")), masked)(X, DY, MASK)
    mean = _check_whole_batch(y, state, dx, masked)
    if masked:  # equal-weight averaging of the replicas' means (pmean of means) is wrong here
        per_replica = [ref.moments(X[r], mask=MASK[r])[0] for r in range(D) if VALID[r]]
        assert np.abs(np.mean(per_replica, axis=0) - mean).max() > 0.1


def test_cross_replica_over_two_nested_vmap_names():
    """cross_replica_axis as a list of names (haiku's Sequence[str]): the statistics span both."""
    f = transformed(jaxbn.haiku.BatchNorm, cross_replica_axis=["i", "j"], create_scale=False, create_offset=False)

    def step(x, mask):
        params, state = f.init(None, x, True, mask=mask)
        return f.apply(params, state, None, x, True, mask=mask)

    nested = jax.jit(jax.vmap(jax.vmap(step, axis_name="j"), axis_name="i"))
    y, state = nested(X.reshape(2, 4, B, C), MASK.reshape(2, 4, B, 1))
    xf, mf = X.reshape(-1, C), MASK.reshape(-1, 1)
    mean, var, _ = ref.moments(xf, mask=mf)
    close(np.asarray(y).reshape(-1, C), ref.normalize(xf, mean, var), 1e-4)
    close(np.asarray(state[VAR]["average"]).reshape(-1, C), np.broadcast_to(var, (D, C)), 1e-5)


@needs_8
def test_cross_replica_under_pmap_matches_the_whole_batch():
    y, state, dx = _replica_step(lambda g: jax.pmap(g, axis_name="i"), True)(X, DY, MASK)
    _check_whole_batch(y, state, dx, True)


@needs_8
def test_cross_replica_under_shard_map_matches_the_whole_batch():
    mesh = Mesh(np.array(jax.devices()[:D]), ("i",))

    def under_shard_map(step):
        def per_shard(x, dy, mask):
            out = step(x[0], dy[0], mask[0])
            return jax.tree.map(lambda a: a[None], out)

        return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("i"), out_specs=P("i")))

    args = [jax.device_put(a, NamedSharding(mesh, P("i"))) for a in (X, DY, MASK)]
    y, state, dx = _replica_step(under_shard_map, True)(*args)
    _check_whole_batch(y, state, dx, True)


@needs_8
@pytest.mark.parametrize("strategy", ["gather", "psum"])
def test_strategy_reaches_the_collectives(strategy):
    """strategy (jaxbn's keyword) picks how the moments cross devices: "gather" all-gathers every
    replica's moments, "psum" does not; both give the whole batch's statistics and gradients."""
    from benchmarks import hlo

    step = _replica_step(lambda g: jax.pmap(g, axis_name="i"), True, strategy=strategy)
    _check_whole_batch(*step(X, DY, MASK), True)
    counts = hlo.count_collectives(step, X, DY, MASK)
    assert counts["all-gather"] == (1 if strategy == "gather" else 0), counts


@needs_8
def test_index_groups_under_pmap():
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    y, state, _ = _replica_step(lambda g: jax.pmap(g, axis_name="i"), True, cross_replica_axis_index_groups=groups)(
        X, DY, MASK
    )
    y, state = np.asarray(y), jax.tree.map(np.asarray, state)
    for g in groups:
        xg, mg = X[g].reshape(-1, C), MASK[g].reshape(-1, 1)
        mean, var, _ = ref.moments(xg, mask=mg)
        close(np.asarray(y[g]).reshape(-1, C), ref.normalize(xg, mean, var), 1e-4)
        close(np.asarray(state[VAR]["average"][g[0]]).reshape(-1), var, 1e-5)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options, message",
    [
        ({"create_scale": False, "scale_init": jnp.ones}, "Cannot set `scale_init` if `create_scale=False`"),
        ({"create_offset": False, "offset_init": jnp.zeros}, "Cannot set `offset_init` if `create_offset=False`"),
        ({"cross_replica_axis_index_groups": [[0, 1]]}, "`cross_replica_axis` name must be specified"),
        ({"data_format": "NHCW?"}, "Unable to extract channel information"),
    ],
)
def test_constructor_errors_are_haikus(options, message):
    kw = {"create_scale": True, "create_offset": True, "decay_rate": DECAY, **options}
    raised = []
    for cls in (hk.BatchNorm, jaxbn.haiku.BatchNorm):
        with pytest.raises(ValueError, match=message) as info:
            hk.transform(lambda cls=cls: cls(**kw)).init(None)
        raised.append(str(info.value))
    assert raised[0] == raised[1]


@pytest.mark.parametrize(
    "options, call, error, message",
    [
        ({}, {"scale": np.ones(3, np.float32)}, ValueError, "Cannot pass `scale` at call time if `create_scale=True`"),
        ({}, {"offset": np.ones(3, np.float32)}, ValueError, "Cannot pass `offset` at call time"),
        ({"create_scale": False}, {"scale": np.ones(4, np.float32)}, ValueError,
         r"scale of shape \(4,\) does not broadcast to inputs of shape \(5, 3\)"),
        ({"create_offset": False}, {"offset": np.ones((2, 5, 3), np.float32)}, ValueError,
         r"offset of shape \(2, 5, 3\) does not broadcast"),
        ({}, {"mask": np.ones((4, 1), bool)}, ValueError, r"mask of shape \(4, 1\) does not broadcast"),
        ({}, {"mask": np.ones((5, 1), np.float32)}, TypeError, "mask must be a boolean"),
        ({"axis": [0, 2]}, {}, ValueError, r"axis=\[0, 2\] is out of range for inputs with 2 dimensions"),
        ({"eps": 0.0}, {}, ValueError, "epsilon must be > 0"),
        ({"cross_replica_axis": "devices"}, {}, NameError, "'devices' is not bound"),
    ],
)
def test_call_errors(options, call, error, message):
    f = transformed(jaxbn.haiku.BatchNorm, **options)
    with pytest.raises(error, match=message):
        f.init(None, np.ones((5, 3), np.float32), True, **call)


def test_import_jaxbn_does_not_import_haiku():
    code = "import sys, jaxbn, jaxbn.linen; assert 'haiku' not in sys.modules, 'haiku imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
