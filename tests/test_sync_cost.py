"""Synchronized moments in one all-reduce: collective counts per placement, each fallback, exact counts.

The default path sums about the running mean on every device (one
all-reduce forward); these tests check that it costs what docs/sync.md says
and that each of its fallbacks (shift far from the mean, shift not the same
on every device) still gives the float64 statistics of the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from benchmarks import hlo
from tests import reference as ref

D, B, C = 8, 4, 3

pytestmark = pytest.mark.skipif(
    jax.device_count() < D, reason=f"needs {D} devices (the root conftest.py sets 8 fake CPU devices)"
)


def _batch(offset=3.0, seed=0):
    rng = np.random.default_rng(seed)
    x = (offset + 2.0 * rng.normal(size=(D, B, C))).astype(np.float32)
    valid = np.array([4, 1, 3, 0, 2, 4, 1, 2])  # unequal, device 3 holds none
    mask = np.arange(B)[None, :, None] < valid[:, None, None]
    return x, mask


def _pmap_step(x, mask, running_mean, strategy="auto"):
    """pmap'd training step: grads of sum(y * x) w.r.t. x, scale, bias, and the new running stats."""

    def step(x, m, rm):
        def loss(x, s, b):
            stats = jaxbn.RunningStats(rm, jnp.ones(C), jnp.zeros((), jnp.int32))
            y, new = jaxbn.batch_norm(x, stats, s, b, training=True, axis_name="i", mask=m, momentum=0.0,
                                      strategy=strategy)
            return jnp.sum(y * x), new

        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, jnp.ones(C), jnp.zeros(C))

    return jax.pmap(step, axis_name="i")(x, mask, running_mean)


def _check_stats(new, x, mask):
    mean, var, _ = ref.moments(x.reshape(-1, C), mask=mask.reshape(-1, 1))
    for dev in range(D):
        np.testing.assert_allclose(new.mean[dev], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new.var[dev], var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "shift",
    [
        pytest.param(lambda x: np.full((D, C), 3.0, np.float32), id="shared, near the mean"),
        pytest.param(lambda x: np.full((D, C), -5e4, np.float32), id="shared, far: recentred"),
        pytest.param(lambda x: np.arange(D * C, dtype=np.float32).reshape(D, C) * 100, id="different per device"),
        pytest.param(lambda x: np.where(np.arange(D)[:, None] == 5, np.nextafter(np.float32(3), np.float32(4)),
                                        np.float32(3)) * np.ones((D, C), np.float32), id="one device 1 ulp off"),
    ],
)
def test_every_shift_gives_the_whole_batch_statistics(shift):
    """The shift changes no result: near, far (second pass) or not the same on every device (Chan)."""
    x, mask = _batch(offset=3.0)
    _, new = _pmap_step(x, mask, shift(x))
    _check_stats(new, x, mask)


def test_large_offset_with_running_mean_at_zero():
    """The first step of training at a 1e4 offset: running mean 0, the shifted sums recentre."""
    x, mask = _batch(offset=1e4, seed=1)
    _, new = _pmap_step(x, mask, np.zeros((D, C), np.float32))
    _check_stats(new, x, mask)


def _pmap_counts(strategy):
    x, mask = _batch()
    rm = jnp.zeros((D, C))

    def step(x, m, rm):
        def loss(x, s, b):
            stats = jaxbn.RunningStats(rm, jnp.ones(C), jnp.zeros((), jnp.int32))
            y, new = jaxbn.batch_norm(x, stats, s, b, training=True, axis_name="i", mask=m, strategy=strategy)
            return jnp.sum(y * x), new

        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, jnp.ones(C), jnp.zeros(C))

    text = jax.pmap(step, axis_name="i").lower(x, mask, rm).compile().as_text()
    ops = hlo.parse_collectives(text)
    return hlo.summarize_collectives(ops, "outside")[0], hlo.summarize_collectives(ops, "branches")[0]


@pytest.mark.parametrize("strategy", ["auto", "psum"])
def test_pmap_step_takes_one_all_reduce_each_way(strategy):
    """pmap with the running stats as per-device values: nothing proves the shift shared, so a
    fingerprint rides in the forward all-reduce and the fallbacks are a recentred pass (1 all-reduce)
    and Chan's combination (2)."""
    every, fallback = _pmap_counts(strategy)
    assert every == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 2}
    assert fallback == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 3}


def test_pmap_gather_step():
    every, fallback = _pmap_counts("gather")
    assert every == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 1, "all-gather": 1}
    assert sum(fallback.values()) == 0


def test_vmap_axis_moments_recentre_at_an_offset():
    """jaxbn.moments has no running mean: it sums about 0, and data far from 0 takes the second pass."""
    x, mask = _batch(offset=1e5, seed=2)
    m = jax.vmap(lambda x, k: jaxbn.moments(x, mask=k, axis_name="v"), axis_name="v")(x, mask)
    mean, var, n = ref.moments(x.reshape(-1, C), mask=mask.reshape(-1, 1))
    np.testing.assert_allclose(m.mean[0], mean, rtol=1e-6)
    np.testing.assert_allclose(m.var[0], var, rtol=1e-3)
    np.testing.assert_array_equal(m.count[0], n)


def test_shard_map_replicated_running_mean_needs_no_fingerprint():
    """Under shard_map the running mean passed with P() is typed replicated: only the recentring fallback."""
    mesh = jax.make_mesh((D,), ("data",))
    x, _ = _batch()
    xs = jax.device_put(x.reshape(D * B, C), NamedSharding(mesh, P("data")))

    def step(x, rm):
        def loss(x):
            stats = jaxbn.RunningStats(rm, jnp.ones(C), jnp.zeros((), jnp.int32))
            y, new = jaxbn.batch_norm(x, stats, training=True, axis_name="data")
            return jnp.sum(y * x), new

        return jax.grad(loss, has_aux=True)(x)

    f = jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"), P()))
    assert hlo.count_collectives(f, xs, jnp.zeros(C), where="outside")["all-reduce"] == 2
    assert hlo.count_collectives(f, xs, jnp.zeros(C), where="branches")["all-reduce"] == 1
    _, new = jax.jit(f)(xs, jnp.zeros(C))
    mean, var, n = ref.moments(x.reshape(-1, C))
    want_mean, want_var, _ = ref.update(np.zeros(C), np.ones(C), 0, mean, var, n)
    np.testing.assert_allclose(new.mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, want_var, rtol=1e-5, atol=1e-6)


def test_counts_past_2_24_are_exact_across_devices():
    """Device 0 holds 2^24 + 3 valid rows, the others 1 each (x and mask built in place: cheap).

    The exact total, 2^24 + 10, is a float32; counts in float32 lose it (float32(2^24 + 3) is
    2^24 + 4, and 2^24 + 4 + 7 rounds again). jaxbn counts in integers across devices too.
    """
    rows = 2**24 + 16
    valid = np.array([2**24 + 3] + [1] * (D - 1))
    values = np.arange(D, dtype=np.float32)

    def f(k, v):
        x = jnp.broadcast_to(v, (rows, 1))
        mask = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < k
        return jaxbn.moments(x, mask=mask, axis_name="i")

    m = jax.pmap(f, axis_name="i")(jnp.asarray(valid, jnp.int32), jnp.asarray(values))
    total = int(valid.sum())
    assert total == 2**24 + 10 and int(np.float32(total)) == total
    np.testing.assert_array_equal(np.asarray(m.count)[:, 0], np.float32(total))
    mean = (valid * values.astype(np.float64)).sum() / total
    var = (valid * (values - mean) ** 2).sum() / total
    np.testing.assert_allclose(m.mean[:, 0], mean, rtol=1e-6)
    np.testing.assert_allclose(m.var[:, 0], var, rtol=1e-5)


def _sharded_jit_step(running_mean, mask=None, dtype="float32", axis_type=jax.sharding.AxisType.Explicit):
    """A jitted train step (grads of sum(y * x) and the new stats) on a batch sharded over a mesh axis.

    Returns the mesh, the step, its arguments, and the batch and mask as numpy arrays (per device).
    """
    mesh = jax.make_mesh((D,), ("data",), axis_types=(axis_type,))
    x, valid = _batch(offset=3.0)
    xs = jax.device_put(jnp.asarray(x.reshape(D * B, C), dtype), NamedSharding(mesh, P("data")))
    ms = None if mask is None else jax.device_put(valid.reshape(D * B, 1), NamedSharding(mesh, P("data")))

    def step(x, m, rm):
        def loss(x):
            stats = jaxbn.RunningStats(rm, jnp.ones(C), jnp.zeros((), jnp.int32))
            y, new = jaxbn.batch_norm(x, stats, training=True, momentum=0.0, mask=m)
            return jnp.sum(y.astype(jnp.float32) * x.astype(jnp.float32)), new

        return jax.grad(loss, has_aux=True)(x)

    return mesh, step, (xs, ms, jnp.asarray(running_mean, jnp.float32)), x, valid


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jit_on_a_sharded_batch_takes_flax_collective_budget(dtype):
    """Plain jit, batch typed sharded: the running mean is the shift, so the forward is one all-reduce
    (no pilot), the backward one; nothing full-size crosses devices (bfloat16 once all-gathered the
    whole cotangent)."""
    _, step, args, _, _ = _sharded_jit_step(np.zeros(C), dtype=dtype)
    every = hlo.count_collectives(step, *args, where="outside")
    assert every == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 2}
    assert hlo.count_collectives(step, *args, where="branches") == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 1}


@pytest.mark.parametrize("mask", [None, "uneven"])
@pytest.mark.parametrize("running_mean", [3.0, -5e4], ids=["near", "far: recentred"])
def test_jit_on_a_sharded_batch_gives_the_whole_batch_statistics(mask, running_mean):
    _, step, args, x, valid = _sharded_jit_step(np.full(C, running_mean), mask)
    _, new = jax.jit(step)(*args)
    m = None if mask is None else valid.reshape(-1, 1)
    mean, var, _ = ref.moments(x.reshape(-1, C), mask=m)
    np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var, var, rtol=1e-4, atol=1e-6)


def test_auto_mesh_in_context_takes_flax_collective_budget():
    """jit under jax.set_mesh of an Auto mesh: two all-reduces per layer, as on Explicit axes;
    with no mesh in context the shift from a slice of the batch costs the third."""
    mesh, step, args, _, _ = _sharded_jit_step(np.zeros(C), axis_type=jax.sharding.AxisType.Auto)
    with jax.set_mesh(mesh):
        inside = hlo.count_collectives(step, *args, where="outside")
    outside = hlo.count_collectives(step, *args, where="outside")
    assert inside == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 2}
    assert outside == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 3}


@pytest.mark.parametrize("mask", [None, "uneven"])
@pytest.mark.parametrize("running_mean", [3.0, -5e4], ids=["near", "far: recentred"])
def test_auto_mesh_in_context_gives_the_whole_batch_statistics(mask, running_mean):
    mesh, step, args, x, valid = _sharded_jit_step(np.full(C, running_mean), mask, axis_type=jax.sharding.AxisType.Auto)
    with jax.set_mesh(mesh):
        grad, new = jax.jit(step)(*args)
    m = None if mask is None else valid.reshape(-1, 1)
    mean, var, _ = ref.moments(x.reshape(-1, C), mask=m)
    np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var, var, rtol=1e-4, atol=1e-6)
    # the same gradient as the one-device step on the whole batch
    want, _ = jax.jit(step)(jnp.asarray(x.reshape(-1, C)), None if mask is None else valid.reshape(-1, 1), args[2])
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_psum_strategy_without_axis_name_sums_about_zero(offset):
    """strategy="psum" with no axis_name: sums about 0 (one all-reduce under jit on a sharded batch),
    recentred when the data sit far from 0, on one device too."""
    x, mask = _batch(offset=offset, seed=3)
    m = jaxbn.moments(x.reshape(-1, C), mask=mask.reshape(-1, 1), strategy="psum")
    mean, var, n = ref.moments(x.reshape(-1, C), mask=mask.reshape(-1, 1))
    np.testing.assert_allclose(m.mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.var, var, rtol=1e-4)
    np.testing.assert_array_equal(m.count, n)


def _module_step_on_auto_mesh(framework, strategy):
    """A linen or nnx BatchNorm's jitted train step (grads of sum(y * x), new running mean) on a batch
    sharded over a mesh with Auto axes, no mesh in context; returns (collectives, step, args, x)."""
    from flax import nnx

    import jaxbn.linen
    import jaxbn.nnx

    mesh = jax.make_mesh((D,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, _ = _batch(offset=3.0, seed=5)
    xs = jax.device_put(jnp.asarray(x.reshape(D * B, C)), NamedSharding(mesh, P("data")))
    if framework == "linen":
        bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.0, strategy=strategy)
        variables = bn.init(jax.random.key(0), xs[:2])

        def step(v, x):
            def loss(x):
                y, upd = bn.apply(v, x, mutable=["batch_stats"])
                return jnp.sum(y * x), upd["batch_stats"]["mean"]

            return jax.grad(loss, has_aux=True)(x)

        args = (variables, xs)
    else:
        model = jaxbn.nnx.BatchNorm(C, momentum=0.0, strategy=strategy, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def step(state, x):
            def loss(x, m):
                y = m(x)
                return jnp.sum(y * x), m.mean[...]

            return nnx.grad(loss, has_aux=True)(x, nnx.merge(graphdef, state))

        args = (state, xs)
    return hlo.count_collectives(step, *args, where="outside"), step, args, x


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_module_strategy_psum_on_an_auto_mesh_without_context(framework):
    """jit on a batch sharded over Auto axes with no mesh in context: the batch's type says nothing, so
    "auto" takes the shift from a slice (3 all-reduces); the module field strategy="psum" sums about the
    running mean (2, flax's budget) and gives the same whole-batch statistics and gradients."""
    counts = {s: _module_step_on_auto_mesh(framework, s) for s in ("auto", "psum")}
    assert counts["auto"][0] == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 3}
    assert counts["psum"][0] == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 2}
    x = counts["psum"][3].reshape(-1, C)
    mean, var, _ = ref.moments(x)
    # d/dx sum(y * x) = y + (dy/dx)^T x: the float64 output plus the closed-form backward of the cotangent x
    want = ref.normalize(x, mean, var) + ref.bn_train_grads(x, x, None)[0]
    got = {}
    for s, (_, step, args, _) in counts.items():
        got[s] = jax.jit(step)(*args)
        np.testing.assert_allclose(got[s][1], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[s][0], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["psum"][0], got["auto"][0], rtol=1e-5, atol=1e-6)
