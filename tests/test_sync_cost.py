"""Synchronized batch norm without a branch: exact whatever the running mean, two collectives per layer.

Every placement (pmap, shard_map, vmap with an axis name, jax.jit on a batch
sharded over Explicit or Auto mesh axes, with or without a mesh in context,
one device), with and without a mask: the compiled training step (forward
and backward) holds no `conditional` and exactly flax's two all-reduces; the
statistics and gradients are the float64 ones of the whole batch, whatever
the running mean holds (NaN, inf, 1e19, a different value per device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from benchmarks import hlo
from tests import reference as ref

D, B, C = 8, 4, 3
VALID = np.array([4, 1, 3, 0, 2, 4, 1, 2])  # unequal valid rows per device; device 3 holds none

pytestmark = pytest.mark.usefixtures("eight_devices")  # fewer devices: every test fails, saying why


def _batch(offset=3.0, seed=0):
    rng = np.random.default_rng(seed)
    x = (offset + 2.0 * rng.normal(size=(D, B, C))).astype(np.float32)
    mask = np.arange(B)[None, :, None] < VALID[:, None, None]
    return x, mask


def _loss(x, m, rm, axis_name=None, strategy="auto"):
    """sum(y^3) / 3 of a training call (cotangent y^2: O(1) at any offset), with the new stats and y as aux."""
    stats = jaxbn.RunningStats(rm, jnp.ones(C), jnp.zeros((), jnp.int32))
    y, new = jaxbn.batch_norm(x, stats, training=True, axis_name=axis_name, mask=m, momentum=0.0,
                              strategy=strategy)
    return jnp.sum(y.astype(x.dtype) ** 3) / 3, (new, y)


def _grad(axis_name=None, strategy="auto"):
    """(dx, (new stats, y)) of `_loss`."""
    return lambda x, m, rm: jax.grad(_loss, has_aux=True)(x, m, rm, axis_name, strategy)


def _sharded(v, mesh):
    return None if v is None else jax.device_put(v.reshape(D * B, -1), NamedSharding(mesh, P("data")))


def _placements(x, mask, rm):
    """placement -> (function, args): one training step each, per-device or on the global batch."""
    xg = jnp.asarray(x.reshape(D * B, C))
    mg = None if mask is None else mask.reshape(D * B, 1)
    explicit = jax.make_mesh((D,), ("data",), axis_types=(AxisType.Explicit,))
    auto = jax.make_mesh((D,), ("data",), axis_types=(AxisType.Auto,))

    def shard_map_step(x, m, rm):
        f = jax.shard_map(_grad("data"), mesh=auto, in_specs=(P("data"), P() if m is None else P("data"), P()),
                          out_specs=(P("data"), (P(), P("data"))))
        return f(x, m, rm)

    def in_mesh(mesh, f):
        def g(*args):
            with jax.set_mesh(mesh):
                return jax.jit(f)(*args)

        def lower(*args):
            with jax.set_mesh(mesh):
                return jax.jit(f).lower(*args)

        g.lower = lower  # type: ignore[attr-defined]
        return g

    rm1 = jnp.asarray(rm[0] if rm.ndim == 2 else rm)
    return {
        "pmap": (jax.pmap(_grad("i"), axis_name="i"), (x, None if mask is None else mask, rm)),
        "vmap": (jax.jit(jax.vmap(_grad("i"), axis_name="i")), (x, None if mask is None else mask, rm)),
        "shard_map": (jax.jit(shard_map_step), (_sharded(x, auto), _sharded(mask, auto), rm1)),
        "jit explicit": (in_mesh(explicit, _grad()), (_sharded(x, explicit), _sharded(mask, explicit), rm1)),
        "jit auto, mesh in context": (in_mesh(auto, _grad()), (_sharded(x, auto), _sharded(mask, auto), rm1)),
        "jit auto, no mesh in context": (jax.jit(_grad()), (_sharded(x, auto), _sharded(mask, auto), rm1)),
        "one device": (jax.jit(_grad()), (xg, mg, rm1)),
    }


PLACEMENTS = list(_placements(*_batch(), np.zeros((D, C), np.float32)))
#: collectives XLA emits per placement for one layer's forward + backward: flax's budget
#: (vmap's collectives are plain reductions; one device has none)
BUDGET = {p: (0 if p in ("vmap", "one device") else 2) for p in PLACEMENTS}


def _compiled_text(f, args):
    return f.lower(*args).compile().as_text()


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_train_step_has_no_conditional_and_flax_collective_budget(placement, masked):
    """From the compiled HLO: zero conditionals, exactly two all-reduces (one each way), nothing else."""
    x, mask = _batch()
    f, args = _placements(x, mask if masked else None, np.zeros((D, C), np.float32))[placement]
    text = _compiled_text(f, args)
    assert hlo.count_conditionals(text) == 0
    counts = hlo.summarize_collectives(hlo.parse_collectives(text))[0]
    assert counts == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": BUDGET[placement]}


def test_gather_strategy_takes_one_all_gather_and_one_all_reduce():
    x, mask = _batch()
    f = jax.pmap(_grad("i", "gather"), axis_name="i")
    text = _compiled_text(f, (x, mask, np.zeros((D, C), np.float32)))
    assert hlo.count_conditionals(text) == 0
    counts = hlo.summarize_collectives(hlo.parse_collectives(text))[0]
    assert counts == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 1, "all-gather": 1}


RUNNING_MEANS = {
    "near": lambda: np.full((D, C), 3.0, np.float32),
    "far": lambda: np.full((D, C), -5e4, np.float32),
    "NaN": lambda: np.full((D, C), np.nan, np.float32),
    "inf": lambda: np.full((D, C), np.inf, np.float32),
    "1e19": lambda: np.full((D, C), 1e19, np.float32),
    "different per device": lambda: np.arange(D * C, dtype=np.float32).reshape(D, C) * 100,
    "one device 1 ulp off": lambda: np.where(np.arange(D)[:, None] == 5, np.nextafter(np.float32(3), np.float32(4)),
                                             np.float32(3)) * np.ones((D, C), np.float32),
}


@pytest.mark.parametrize("strategy", ["auto", "psum", "gather"])
@pytest.mark.parametrize("running_mean", list(RUNNING_MEANS))
def test_whatever_the_running_mean_the_outputs_and_statistics_are_exact(running_mean, strategy):
    """pmap with a mask (device 3 all masked), at a 1e4 offset: y, dx and the batch statistics are the
    float64 ones of the whole batch, the same for every running mean and strategy."""
    x, mask = _batch(offset=1e4, seed=1)
    rm = RUNNING_MEANS[running_mean]()
    dx, (new, y) = jax.pmap(_grad("i", strategy), axis_name="i")(x, mask, rm)
    xf, mf = x.reshape(-1, C), mask.reshape(-1, 1)
    mean, var, _ = ref.moments(xf, mask=mf)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, C), ref.normalize(xf, mean, var), rtol=1e-3, atol=2e-3)
    # the whole batch on one device, float64 throughout (jax x64): the same gradient
    with jax.enable_x64(True):
        want, _ = jax.jit(_grad())(jnp.asarray(xf, jnp.float64), jnp.asarray(mf), jnp.zeros(C, jnp.float64))
    np.testing.assert_allclose(np.asarray(dx).reshape(-1, C), want, rtol=1e-3, atol=1e-3)
    if np.all(np.isfinite(rm)):  # momentum 0: the new running stats are the batch's (0 * inf is NaN)
        for dev in range(D):
            np.testing.assert_allclose(new.mean[dev], mean, rtol=1e-6)
            np.testing.assert_allclose(new.var[dev], var, rtol=1e-4)


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
@pytest.mark.parametrize("placement", [p for p in PLACEMENTS if p != "one device"])
def test_every_placement_gives_the_whole_batch_result(placement, masked):
    """Statistics and gradients of each placement against the float64 whole-batch statistics and the
    one-device gradient on the whole batch, at a 1e4 offset with the running mean far from the data."""
    x, mask = _batch(offset=1e4, seed=2)
    mask = mask if masked else None
    places = _placements(x, mask, np.full((D, C), -5e4, np.float32))
    f, args = places[placement]
    dx, (new, _) = f(*args)
    want_dx, _ = places["one device"][0](*places["one device"][1])
    mean, var, _ = ref.moments(x.reshape(-1, C), mask=None if mask is None else mask.reshape(-1, 1))
    np.testing.assert_allclose(np.asarray(new.mean).reshape(-1, C)[0], mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var).reshape(-1, C)[0], var, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dx).reshape(-1, C), np.asarray(want_dx), rtol=1e-4, atol=1e-4)


def test_vmap_axis_moments_at_an_offset():
    """jaxbn.moments across a vmap axis, at a 1e5 offset, one member all masked."""
    x, mask = _batch(offset=1e5, seed=2)
    m = jax.vmap(lambda x, k: jaxbn.moments(x, mask=k, axis_name="v"), axis_name="v")(x, mask)
    mean, var, n = ref.moments(x.reshape(-1, C), mask=mask.reshape(-1, 1))
    np.testing.assert_allclose(m.mean[0], mean, rtol=1e-6)
    np.testing.assert_allclose(m.var[0], var, rtol=1e-3)
    np.testing.assert_array_equal(m.count[0], n)


def test_counts_past_2_24_are_exact_across_devices():
    """Device 0 holds 2^24 + 3 valid rows, the others 1 each (x and mask built in place: cheap).

    The exact total, 2^24 + 10, is a float32; counts in float32 lose it (float32(2^24 + 3) is
    2^24 + 4, and 2^24 + 4 + 7 rounds again). jaxbn counts in integers, and across devices in float64.
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


def test_program_size_does_not_grow_with_the_features():
    """The lowered program of a synchronized train step has as many ops at 2048 features as at 64."""

    def ops(c):
        x = jnp.zeros((D, 2, 4, 4, c))

        def step(x):
            stats = jaxbn.init_stats(c)
            return jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, stats, training=True, axis_name="i")[0] ** 3))(x)

        return len(jax.pmap(step, axis_name="i").lower(x).as_text().splitlines())

    assert ops(2048) == ops(64)


@pytest.mark.parametrize("placement", ["pmap", "jit auto, no mesh in context"])
def test_float32_collectives_where_float64_cannot_cross_devices(placement, monkeypatch):
    """On TPU collectives carry no float64: the statistics cross devices in float32 (Chan's formula),
    exact at a 1e4 offset; the HLO then holds no f64 at all."""
    import jaxbn._stats

    monkeypatch.setattr(jaxbn._stats, "wide_collectives", lambda: False)
    x, mask = _batch(offset=1e4, seed=4)
    f, args = _placements(x, mask, np.full((D, C), np.nan, np.float32))[placement]
    assert "f64" not in _compiled_text(f, args)
    _, (new, _) = f(*args)
    mean, var, _ = ref.moments(x.reshape(-1, C), mask=mask.reshape(-1, 1))
    np.testing.assert_allclose(np.asarray(new.var).reshape(-1, C)[0], var, rtol=1e-4)


def _module_step(framework, mesh_axis_type):
    """A linen or nnx BatchNorm's jitted train step on a batch sharded over a mesh, no mesh in context."""
    from flax import nnx

    import jaxbn.linen
    import jaxbn.nnx

    mesh = jax.make_mesh((D,), ("data",), axis_types=(mesh_axis_type,))
    x, _ = _batch(offset=3.0, seed=5)
    xs = jax.device_put(jnp.asarray(x.reshape(D * B, C)), NamedSharding(mesh, P("data")))
    if framework == "linen":
        bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.0)
        variables = bn.init(jax.random.key(0), xs[:2])

        def step(v, x):
            def loss(x):
                y, upd = bn.apply(v, x, mutable=["batch_stats"])
                return jnp.sum(y * x), upd["batch_stats"]["mean"]

            return jax.grad(loss, has_aux=True)(x)

        return step, (variables, xs), x
    model = jaxbn.nnx.BatchNorm(C, momentum=0.0, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def nnx_step(state, x):
        def loss(x, m):
            y = m(x)
            return jnp.sum(y * x), m.mean[...]

        return nnx.grad(loss, has_aux=True)(x, nnx.merge(graphdef, state))

    return nnx_step, (state, xs), x


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_modules_on_a_sharded_batch_take_flax_budget(framework):
    """The modules under jit on a batch sharded over Auto axes, no mesh in context: two all-reduces,
    the float64 whole-batch mean, and d/dx sum(y * x) = y + J^T x in closed form."""
    step, args, x = _module_step(framework, AxisType.Auto)
    assert hlo.count_collectives(step, *args) == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 2}
    x = x.reshape(-1, C)
    mean, var, _ = ref.moments(x)
    want = ref.normalize(x, mean, var) + ref.bn_train_grads(x, x, None)[0]
    dx, got_mean = jax.jit(step)(*args)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["auto", "gather"])
def test_64_participants_pmap_over_vmap(strategy):
    """8 devices x 8 vmap members = 64 participants (axis_name=("i", "v")), uneven masks, some members
    all masked, a 1e4 offset and a NaN running mean: the float64 statistics of the whole batch."""
    rng = np.random.default_rng(6)
    x = (1e4 + rng.normal(size=(D, 8, B, C))).astype(np.float32)
    valid = rng.integers(0, B + 1, size=(D, 8))
    mask = np.arange(B)[None, None, :, None] < valid[..., None, None]
    rm = np.full((D, 8, C), np.nan, np.float32)

    def member(x, m, rm):
        stats = jaxbn.RunningStats(rm, jnp.ones(C), jnp.zeros((), jnp.int32))
        return jaxbn.batch_norm(x, stats, training=True, axis_name=("i", "v"), mask=m, momentum=0.0,
                                strategy=strategy)

    y, new = jax.pmap(jax.vmap(member, axis_name="v"), axis_name="i")(x, mask, rm)
    xf, mf = x.reshape(-1, C), mask.reshape(-1, 1)
    mean, var, _ = ref.moments(xf, mask=mf)
    np.testing.assert_allclose(np.asarray(new.var).reshape(-1, C), np.broadcast_to(var, (D * 8, C)), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, C), ref.normalize(xf, mean, var), rtol=1e-3, atol=2e-3)
