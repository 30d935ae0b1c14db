"""The anchors' public batch-norm threads about transforms, run against the anchor and jaxbn's drop-in.

Each test runs the thread's snippet (or its smallest faithful version) with the anchor installed here
and with jaxbn's drop-in. Most of these threads are transform semantics that no batch norm can change
(docs/migrating.md says which): there the test shows that the anchor and jaxbn fail alike, then runs
the fix that works, checked against float64. Behaviour that depends on the installed anchor version is
checked, not assumed: where an anchor has fixed a thread, the test checks the fix instead.
"""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn.equinox
import jaxbn.haiku
import jaxbn.linen
import jaxbn.nnx
from tests import reference as ref

EPS = 1e-5


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


def outcome(fn):
    """(True, value) or (False, exception): the anchor's behaviour, to be checked either way."""
    try:
        return True, fn()
    except Exception as e:  # noqa: BLE001 - the caller checks the type and message
        return False, e


# ---------------------------------------------------------------- google/flax#2052 (open)


def _scan_mlp(BN):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, c, x):
            h = nn.Dense(features=10)(x)
            h = BN(use_running_average=False)(h)
            return c, nn.Dense(features=1)(h)

    class ScanMLP(nn.Module):
        @nn.compact
        def __call__(self, c, xs):
            scan = nn.scan(MLP, variable_carry="batch_stats", variable_broadcast="params",
                           split_rngs={"params": False})
            return scan(name="MLP")(c, xs)

    return MLP, ScanMLP


XS = np.random.default_rng(0).normal(size=(10, 4, 2)).astype(np.float32)  # 10 scan steps of a (4, 2) batch


@pytest.mark.parametrize("BN", [nn.BatchNorm, jaxbn.linen.BatchNorm], ids=["flax", "jaxbn"])
def test_flax_2052_scan_with_batch_stats_carry_inside_a_module(BN):
    """`init` of a module that wraps `nn.scan(..., variable_carry='batch_stats')`: a lifting bug."""
    _, ScanMLP = _scan_mlp(BN)
    ok, result = outcome(lambda: ScanMLP().init(jax.random.key(1), (), XS))
    if not ok:  # the carry is created inside the scan body: its structure changes, whatever the layer
        assert isinstance(result, TypeError) and "carry" in str(result), result
    flax_ok, _ = outcome(lambda: _scan_mlp(nn.BatchNorm)[1]().init(jax.random.key(1), (), XS))
    assert ok == flax_ok  # the same for flax's layer and jaxbn's: no batch norm can change it


def test_flax_2052_workaround_init_unscanned_then_scan():
    """Init the scanned module alone and nest its variables: jaxbn's stats are the EMA step by step."""
    MLP, ScanMLP = _scan_mlp(jaxbn.linen.BatchNorm)
    v0 = MLP().init(jax.random.key(1), (), XS[0])
    variables = {col: {"MLP": tree} for col, tree in v0.items()}
    (_, ys), new = ScanMLP().apply(variables, (), XS, mutable="batch_stats")
    p = v0["params"]
    mean, var = np.zeros(10), np.ones(10)
    for t in range(len(XS)):
        h = XS[t].astype(np.float64) @ np.asarray(p["Dense_0"]["kernel"], np.float64) + np.asarray(p["Dense_0"]["bias"])
        m, v, _ = ref.moments(h)
        yn = ref.normalize(h, m, v, p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"], eps=EPS)
        close(ys[t], yn @ np.asarray(p["Dense_1"]["kernel"], np.float64) + np.asarray(p["Dense_1"]["bias"]), 1e-4)
        mean, var = 0.99 * mean + 0.01 * m, 0.99 * var + 0.01 * v
    stats = new["batch_stats"]["MLP"]["BatchNorm_0"]
    close(stats["mean"], mean)
    close(stats["var"], var)


# ---------------------------------------------------------------- google/flax#3319 (open)


def _nested_vmap(BN, names):
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            return BN(use_running_average=False, axis_name=names, momentum=0.9)(nn.Dense(3)(x))

    kw = dict(variable_axes={"params": None, "batch_stats": None}, split_rngs={"params": False}, in_axes=0,
              out_axes=0)
    return nn.vmap(nn.vmap(Inner, axis_name="inner", **kw), axis_name="outer", **kw)


X3319 = np.random.default_rng(1).normal(size=(2, 5, 4)).astype(np.float32)  # (outer, inner, features)


@pytest.mark.parametrize("BN", [nn.BatchNorm, jaxbn.linen.BatchNorm], ids=["flax", "jaxbn"])
def test_flax_3319_nested_vmap_syncing_only_the_inner_axis(BN):
    """Stats synced over "inner" only differ along "outer", so one shared `batch_stats` cannot hold them."""
    model = _nested_vmap(BN, "inner")
    variables = model().init(jax.random.key(1), X3319)
    with pytest.raises(ValueError, match="mapped output"):
        model().apply(variables, X3319, mutable="batch_stats")


def test_flax_3319_naming_both_axes():
    """axis_name=("outer", "inner"): the moments of the whole (2 x 5) batch, in flax and in jaxbn."""
    got = {}
    for BN in (nn.BatchNorm, jaxbn.linen.BatchNorm):
        model = _nested_vmap(BN, ("outer", "inner"))
        variables = model().init(jax.random.key(1), X3319)
        got[BN] = model().apply(variables, X3319, mutable="batch_stats")
    y, new = got[jaxbn.linen.BatchNorm]
    p = variables["params"]
    h = X3319.reshape(-1, 4).astype(np.float64) @ np.asarray(p["Dense_0"]["kernel"], np.float64)
    h = h + np.asarray(p["Dense_0"]["bias"])
    m, v, _ = ref.moments(h)
    close(np.asarray(y).reshape(-1, 3), ref.normalize(h, m, v, eps=EPS), 1e-4)
    close(new["batch_stats"]["BatchNorm_0"]["mean"], 0.1 * m)
    close(new["batch_stats"]["BatchNorm_0"]["var"], 0.9 + 0.1 * v)
    close(got[nn.BatchNorm][0], y, 1e-4)  # flax is right here too: the fix is the axis names, not the layer


# ---------------------------------------------------------------- google/flax#4760 (closed)


def _conv_bn(BN, axis_name=None):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 5, kernel_size=3, rngs=rngs)
            self.bn = BN(5, rngs=rngs, axis_name=axis_name)

        def __call__(self, x):
            return self.bn(self.conv(x))

    return Model(rngs=nnx.Rngs(0))


D4760 = np.random.default_rng(2).normal(size=(16, 16, 8, 1)).astype(np.float32)


def test_flax_4760_nnx_vmap_of_a_training_batch_norm():
    """The thread's second snippet: each vmapped slice would update the one shared BatchStat differently.

    The thread saw an UnexpectedTracerError on the second call (flax 0.10); flax 0.12 refuses the
    first call with a clear error instead. Either way it is nnx.vmap's rule on shared state, and
    jaxbn's layer behaves exactly as flax's.
    """
    seen = []
    for BN in (nnx.BatchNorm, jaxbn.nnx.BatchNorm):
        model = _conv_bn(BN)
        vmap_call = nnx.vmap(lambda m, x: m(x), in_axes=(None, 1))
        calls = [outcome(lambda m=model, f=vmap_call: f(m, D4760)) for _ in range(2)]
        seen.append([(ok, type(r).__name__ if not ok else "ok") for ok, r in calls])
    assert seen[0] == seen[1]
    for ok, name in seen[0]:
        assert ok or name in {"ValueError", "TraceContextError", "UnexpectedTracerError"}, seen


def test_flax_4760_sync_over_the_vmapped_axis():
    """axis_name on nnx.vmap and on the layer: one set of statistics, updated twice like the whole batch's."""
    ys, means = {}, {}
    for BN in (nnx.BatchNorm, jaxbn.nnx.BatchNorm):
        model = _conv_bn(BN, axis_name="v")
        vmap_call = nnx.vmap(lambda m, x: m(x), in_axes=(None, 1), out_axes=1, axis_name="v")
        ys[BN] = [vmap_call(model, D4760) for _ in range(2)]
        means[BN] = (model.bn.mean[...], model.bn.var[...])
    model = _conv_bn(jaxbn.nnx.BatchNorm)
    h = np.asarray(model.conv(jnp.asarray(D4760.reshape(-1, 8, 1))), np.float64).reshape(-1, 5)
    m, v, _ = ref.moments(h)
    mean, var = np.zeros(5), np.ones(5)
    for _ in range(2):
        mean, var = 0.99 * mean + 0.01 * m, 0.99 * var + 0.01 * v
    close(means[jaxbn.nnx.BatchNorm][0], mean)
    close(means[jaxbn.nnx.BatchNorm][1], var)
    close(np.asarray(ys[jaxbn.nnx.BatchNorm][0]).reshape(-1, 5), ref.normalize(h, m, v, eps=EPS), 1e-4)
    close(ys[nnx.BatchNorm][1], ys[jaxbn.nnx.BatchNorm][1], 1e-4)


# ---------------------------------------------------------------- dm-haiku#786 / #788 / #790 (open)


def _hk_vmapped(BN, x):
    t = hk.transform_with_state(lambda x, is_training: BN(True, True, 0.9, cross_replica_axis="i")(x, is_training))
    params, state = jax.vmap(t.init, in_axes=(None, 0, None), out_axes=(None, None), axis_name="i")(None, x, True)
    return jax.vmap(t.apply, in_axes=(None, None, None, 0, None), out_axes=(0, None), axis_name="i")(
        params, state, None, x, True)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_haiku_786_cross_replica_axis_under_jax_vmap(offset):
    """One example per vmap index, `cross_replica_axis` naming the vmap axis.

    The haiku installed here runs it; its variance is E[x^2] - E[x]^2 in the input dtype, so an offset
    of 1e4 loses it (wrong outputs and running variance). jaxbn's is the float64 value either way.
    """
    x = (offset + np.random.default_rng(3).normal(size=(64, 3))).astype(np.float32)
    m, v, _ = ref.moments(x)
    ok, result = outcome(lambda: _hk_vmapped(hk.BatchNorm, jnp.asarray(x)))
    y, state = _hk_vmapped(jaxbn.haiku.BatchNorm, jnp.asarray(x))
    close(y, ref.normalize(x, m, v, eps=EPS), 1e-3)
    close(state["batch_norm/~/var_ema"]["average"].reshape(-1), v, 1e-4)
    if ok and offset == 0.0:  # the threads' request works on this haiku for well-scaled data
        close(result[0], ref.normalize(x, m, v, eps=EPS), 1e-3)
    elif ok:  # and still fails on offset data: cancellation in E[x^2] - E[x]^2
        assert np.abs(np.asarray(result[0], np.float64) - ref.normalize(x, m, v, eps=EPS)).max() > 1.0
        assert np.abs(np.asarray(result[1]["batch_norm/~/var_ema"]["average"]).reshape(-1) - v).max() > 0.5


# ---------------------------------------------------------------- patrick-kidger/equinox#707 (open)


X707 = np.random.default_rng(4).normal(size=(3, 8, 2)).astype(np.float32)  # (n_samples, batch, features)


def _vmap_twice(BN, names):
    bn, state = eqx.nn.make_with_state(BN)(2, names, mode="batch")
    inner = jax.vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
    return bn, state, jax.vmap(inner, in_axes=(0, None), out_axes=(0, None), axis_name="samples")


@pytest.mark.parametrize("BN", [eqx.nn.BatchNorm, jaxbn.equinox.BatchNorm], ids=["equinox", "jaxbn"])
def test_equinox_707_vmap_twice_with_one_axis_name(BN):
    """Stats over "batch" only differ per sample, so the one state (out_axes None) cannot hold them."""
    _, state, twice = _vmap_twice(BN, "batch")
    with pytest.raises(ValueError, match="mapped output"):
        twice(jnp.asarray(X707), state)


def test_equinox_707_naming_both_axes():
    got = {}
    for BN in (eqx.nn.BatchNorm, jaxbn.equinox.BatchNorm):
        bn, state, twice = _vmap_twice(BN, ("samples", "batch"))
        y, state = twice(jnp.asarray(X707), state)
        got[BN] = (y, state.get(bn.batch_state_index))
    y, (mean, var) = got[jaxbn.equinox.BatchNorm]
    m, v, _ = ref.moments(X707.reshape(-1, 2))
    close(np.asarray(y).reshape(-1, 2), ref.normalize(X707.reshape(-1, 2), m, v, eps=EPS), 1e-4)
    close(mean, 0.01 * m)
    close(var, 0.99 + 0.01 * v)
    close(got[eqx.nn.BatchNorm][0], y, 1e-4)


# ---------------------------------------------------------------- patrick-kidger/equinox#1074 (open)


@pytest.mark.parametrize("BN", [eqx.nn.BatchNorm, jaxbn.equinox.BatchNorm], ids=["equinox", "jaxbn"])
def test_equinox_1074_axis_name_is_a_pytree_leaf(BN):
    """jaxbn keeps equinox's fields (checkpoints line up), so the string leaf stops plain JAX APIs alike."""
    bn, _ = eqx.nn.make_with_state(BN)(2, "batch", mode="batch")
    with pytest.raises(TypeError, match="not a valid JAX type"):
        jax.device_put(bn)


def test_equinox_1074_partition_the_arrays():
    """What the thread settles on: move the arrays, keep the rest static (eqx.partition / eqx.filter_jit)."""
    bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(2, "batch", mode="batch")
    arrays, static = eqx.partition(bn, eqx.is_array)
    arrays = jax.device_put(arrays, jax.devices()[0])
    x = X707[0]

    @jax.jit
    def step(arrays, state, x):
        return jax.vmap(eqx.combine(arrays, static), in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)

    y, _ = step(arrays, state, jnp.asarray(x))
    m, v, _ = ref.moments(x)
    close(y, ref.normalize(x, m, v, eps=EPS), 1e-4)


# ---------------------------------------------------------------- patrick-kidger/equinox#1010 (closed)


@pytest.mark.parametrize("BN", [eqx.nn.BatchNorm, jaxbn.equinox.BatchNorm], ids=["equinox", "jaxbn"])
def test_equinox_1010_batch_mode_inference_before_training(BN):
    """Inference before any training step: 0/0 in equinox's debias when the thread was filed.

    The equinox installed here has the fix (the statistics start at mean 0, var 1); jaxbn never divided.
    """
    bn, state = eqx.nn.make_with_state(BN)(2, "batch", mode="batch", inference=True)
    x = X707[0]
    y, _ = jax.vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(jnp.asarray(x), state)
    if BN is eqx.nn.BatchNorm and not np.all(np.isfinite(np.asarray(y))):
        pytest.fail("this equinox still divides by zero before training (equinox#1010)")
    close(y, x / np.sqrt(1.0 + EPS))
