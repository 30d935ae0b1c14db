"""Cross-device batch statistics (sync-BN) on 8 simulated CPU devices.

Every path (pmap, shard_map inside jit, vmap with an axis name, pmap over
vmap, plain jit on a sharded batch) is checked against the single-device
float64 result on the concatenated batch, valid entries only: outputs,
updated running stats, input gradients and parameter gradients (summed over
devices where each device holds its own). The devices hold DIFFERENT
numbers of valid entries, one of them none at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from tests import reference as ref

D, B, C = 8, 4, 3  # devices, entries per device, features
MOMENTUM = 0.9
# Valid entries per device: unequal, and device 3 holds none (an empty shard).
VALID = np.array([4, 1, 3, 0, 2, 4, 1, 2])

pytestmark = pytest.mark.usefixtures("eight_devices")  # fewer devices: every test fails, saying why


def _data(seed=0, offset=3.0, spread=2.0):
    rng = np.random.default_rng(seed)
    x = (offset + spread * rng.normal(size=(D, B, C))).astype(np.float32)
    dy = rng.normal(size=(D, B, C)).astype(np.float32)
    mask = np.arange(B)[None, :, None] < VALID[:, None, None]  # (D, B, 1)
    scale = (1.0 + 0.5 * rng.normal(size=C)).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    return x, mask, dy, scale, bias


X, MASK, DY, SCALE, BIAS = _data()


def _expected(x, mask, dy, scale, bias):
    """float64 single-device results on the concatenated batch: y, stats, grads."""
    xf, mf, dyf = x.reshape(-1, C), mask.reshape(-1, 1), dy.reshape(-1, C)
    mean, var, n = ref.moments(xf, mask=mf)
    y = ref.normalize(xf, mean, var, scale, bias)
    new_mean, new_var, _ = ref.update(np.zeros(C), np.ones(C), 0, mean, var, n, momentum=MOMENTUM)
    dx, dscale, dbias = ref.bn_train_grads(xf, dyf, scale, mask=mf)
    return {"y": y, "mean": new_mean, "var": new_var, "dx": dx, "dscale": dscale, "dbias": dbias}


EXPECTED = _expected(X, MASK, DY, SCALE, BIAS)


def _local_step(x, mask, dy, scale, bias, *, axis_name, op=jaxbn.batch_norm, **kw):
    """One device's training step: y, updated stats, and grads of sum(y * dy)."""

    def loss(x, scale, bias):
        y, new = op(
            x, jaxbn.init_stats(C), scale, bias, training=True, axis_name=axis_name, mask=mask,
            momentum=MOMENTUM, **kw,
        )
        return jnp.sum(y * dy), (y, new)

    (_, (y, new)), (dx, dscale, dbias) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return {"y": y, "mean": new.mean, "var": new.var, "dx": dx, "dscale": dscale, "dbias": dbias}


def _check(got, expected=None, *, per_device_params=False, rtol=2e-5, atol=2e-5):
    """Compares results to the single-device ones; per-device param grads are summed first."""
    expected = EXPECTED if expected is None else expected
    for k in ("y", "dx"):
        np.testing.assert_allclose(np.asarray(got[k]).reshape(-1, C), expected[k], rtol=rtol, atol=atol, err_msg=k)
    for k in ("mean", "var"):
        v = np.asarray(got[k])
        if v.ndim > 1:  # one copy per device: all equal
            np.testing.assert_array_equal(v, np.broadcast_to(v.reshape(-1, C)[0], v.shape), err_msg=k)
            v = v.reshape(-1, C)[0]
        np.testing.assert_allclose(v, expected[k], rtol=rtol, atol=atol, err_msg=k)
    for k in ("dscale", "dbias"):
        v = np.asarray(got[k])
        if per_device_params:
            v = v.reshape(-1, C).sum(0)
        np.testing.assert_allclose(v, expected[k], rtol=rtol, atol=10 * atol, err_msg=k)
    for k, v in got.items():
        assert np.all(np.isfinite(np.asarray(v))), f"{k} has non-finite entries"


def _mesh(shape=(D,), names=("data",)):
    return jax.make_mesh(shape, names)


def _put(mesh, spec, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]


# ----------------------------------------------------------------------------- pmap, vmap, nestings


@pytest.mark.parametrize("strategy", ["gather", "psum"])
def test_pmap_matches_concatenated_batch(strategy):
    f = jax.pmap(
        lambda *a: _local_step(*a, axis_name="i", strategy=strategy), axis_name="i", in_axes=(0, 0, 0, None, None)
    )
    _check(f(X, MASK, DY, SCALE, BIAS), per_device_params=True)


def test_vmap_axis_name_matches_concatenated_batch():
    f = jax.jit(jax.vmap(lambda *a: _local_step(*a, axis_name="b"), axis_name="b", in_axes=(0, 0, 0, None, None)))
    _check(f(X, MASK, DY, SCALE, BIAS), per_device_params=True)


def test_vmap_with_gradient_taken_outside():
    """The global loss differentiated from outside the vmap (equinox's test pattern)."""

    def loss(x, scale, bias):
        def bn(xb, mb):
            return jaxbn.batch_norm(xb, jaxbn.init_stats(C), scale, bias, training=True, axis_name="b", mask=mb)[0]

        return jnp.sum(jax.vmap(bn, axis_name="b")(x, MASK) * DY)

    dx, dscale, dbias = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(X, SCALE, BIAS)
    np.testing.assert_allclose(np.asarray(dx).reshape(-1, C), EXPECTED["dx"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(dscale, EXPECTED["dscale"], rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(dbias, EXPECTED["dbias"], rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("wrap", ["jit", "scan", "remat", "jvp"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradient_of_a_traced_program_holding_the_sync(wrap, masked):
    """`grad` of a program that was traced before it is differentiated (an inner `jit`, a `scan` body, `remat`,
    forward mode): JAX differentiates it after the statistics were traced, and still gets the global loss's
    gradient. d/dx_j of sum_c a_c mean_c + b_c var_c is w_j (a_c + 2 b_c (x_jc - mean_c)) / N."""
    x = X + np.float32(1e3)
    mask = MASK if masked else np.ones_like(MASK)
    a, b = SCALE, BIAS

    def stats(xb, mb):
        m = jaxbn.moments(xb, mask=mb if masked else None, axis_name="d")
        return jnp.sum(a * m.mean + b * m.var)

    inner = {"jit": jax.jit(stats), "remat": jax.checkpoint(stats), "jvp": stats, "scan": stats}[wrap]

    def loss(x):
        per_device = jax.vmap(inner, axis_name="d")
        if wrap == "scan":
            return jax.lax.scan(lambda c, xs: (c + per_device(xs, mask)[0], None), 0.0, x[None])[0]
        return per_device(x, mask)[0]

    if wrap == "jvp":
        grad = jax.jacfwd(loss)(x)
    else:
        grad = jax.jit(jax.grad(loss))(x)
    xs, w = x.reshape(-1, C).astype(np.float64), np.asarray(mask, np.float64).reshape(-1, 1)
    n = w.sum()
    mean = (w * xs).sum(0) / n
    want = w * (a + 2 * b * (xs - mean)) / n
    np.testing.assert_allclose(np.asarray(grad).reshape(-1, C), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["gather", "psum"])
def test_pmap_over_vmap_with_tuple_axis_name(strategy):
    def inner(*a):
        return _local_step(*a, axis_name=("p", "v"), strategy=strategy)

    f = jax.pmap(
        jax.vmap(inner, axis_name="v", in_axes=(0, 0, 0, None, None)), axis_name="p", in_axes=(0, 0, 0, None, None)
    )
    split = [a.reshape(4, 2, *a.shape[1:]) for a in (X, MASK, DY)]
    _check(f(*split, SCALE, BIAS), per_device_params=True)


def test_batch_renorm_synced_matches_single_device():
    """batch_renorm across devices equals batch_renorm on the concatenated batch (one device)."""
    stats = jaxbn.RunningStats(jnp.full(C, 2.5), jnp.full(C, 3.0), jnp.zeros((), jnp.int32))

    def step(x, mask, dy, axis_name):
        def loss(x, scale):
            y, new = jaxbn.batch_renorm(
                x, stats, scale, BIAS, training=True, axis_name=axis_name, mask=mask, r_max=1.5, d_max=0.5
            )
            return jnp.sum(y * dy), (y, new)

        (_, (y, new)), (dx, ds) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, SCALE)
        return y, new.mean, new.var, dx, ds

    got = jax.pmap(lambda x, m, dy: step(x, m, dy, "i"), axis_name="i")(X, MASK, DY)
    want = jax.jit(step, static_argnums=3)(X.reshape(-1, C), MASK.reshape(-1, 1), DY.reshape(-1, C), None)
    np.testing.assert_allclose(np.asarray(got[0]).reshape(-1, C), want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1][0], want[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2][0], want[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[3]).reshape(-1, C), want[3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[4]).sum(0), want[4], rtol=1e-5, atol=1e-4)
    # and both against float64 from the definition (Ioffe 2017: r and d are constants for the gradient)
    e = _renorm_expected(2.5, 3.0, r_max=1.5, d_max=0.5)
    np.testing.assert_allclose(np.asarray(got[0]).reshape(-1, C), e["y"], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(got[1][0], e["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2][0], e["var"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[3]).reshape(-1, C), e["dx"], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got[4]).sum(0), e["dscale"], rtol=1e-5, atol=1e-4)


def _renorm_expected(run_mean, run_var, r_max, d_max, momentum=0.99, eps=1e-5):
    """float64 batch renorm on the concatenated batch: y, the updated running stats, dx and dscale."""
    xf, mf, dyf = X.reshape(-1, C).astype(np.float64), MASK.reshape(-1, 1), DY.reshape(-1, C)
    y, mean, var, n = ref.renorm_train(xf, np.full(C, run_mean), np.full(C, run_var), SCALE, BIAS,
                                       r_max=r_max, d_max=d_max, eps=eps, mask=mf)
    new_mean, new_var, _ = ref.update(np.full(C, run_mean), np.full(C, run_var), 0, mean, var, n, momentum)
    s_b, s = np.sqrt(var + eps), np.sqrt(run_var + eps)
    r, d = np.clip(s_b / s, 1 / r_max, r_max), np.clip((mean - run_mean) / s, -d_max, d_max)
    dx = ref.bn_train_grads(xf, dyf, SCALE * r, mask=mf, eps=eps)[0]
    dscale = (dyf * ((xf - mean) / s_b * r + d)).sum(0)
    return {"y": y, "mean": new_mean, "var": new_var, "dx": dx, "dscale": dscale}


# ----------------------------------------------------------------------------- shard_map and jit sharding


@pytest.mark.parametrize("strategy", ["auto", "gather", "psum"])
def test_shard_map_in_jit_matches_concatenated_batch(strategy):
    mesh = _mesh()
    d, r = P("data"), P()
    f = jax.jit(
        jax.shard_map(
            lambda x, m, dy, s, b: _local_step(x, m, dy, s, b, axis_name="data", strategy=strategy),
            mesh=mesh,
            in_specs=(d, d, d, r, r),
            # The running stats and the parameter gradients come out replicated.
            out_specs={"y": d, "dx": d, "mean": r, "var": r, "dscale": r, "dbias": r},
        )
    )
    x, m, dy = _put(mesh, d, X.reshape(-1, C), MASK.reshape(-1, 1), DY.reshape(-1, C))
    got = f(x, m, dy, SCALE, BIAS)
    assert got["y"].sharding.spec[0] == "data"
    _check(got)


@pytest.mark.parametrize("jit_grad", [True, False], ids=["jit_grad", "eager_grad"])
def test_shard_map_gradient_of_the_global_loss(jit_grad):
    """jax.grad of a jitted shard_map'd model, as in a training step."""
    mesh = _mesh()
    d, r = P("data"), P()
    bn = jax.jit(
        jax.shard_map(
            lambda x, m, s, b: jaxbn.batch_norm(x, jaxbn.init_stats(C), s, b, training=True, axis_name="data", mask=m),
            mesh=mesh,
            in_specs=(d, d, r, r),
            out_specs=(d, jaxbn.RunningStats(r, r, r)),
        )
    )
    x, m, dy = _put(mesh, d, X.reshape(-1, C), MASK.reshape(-1, 1), DY.reshape(-1, C))

    def loss(x, s, b):
        return jnp.sum(bn(x, m, s, b)[0] * dy)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    if jit_grad:
        dx, ds, db = jax.jit(grad)(x, SCALE, BIAS)
    else:  # JAX needs the mesh in context to transpose a jitted shard_map eagerly (any shard_map, not jaxbn's)
        with jax.set_mesh(mesh):
            dx, ds, db = grad(x, SCALE, BIAS)
    np.testing.assert_allclose(np.asarray(dx), EXPECTED["dx"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(ds, EXPECTED["dscale"], rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(db, EXPECTED["dbias"], rtol=2e-5, atol=2e-4)


def test_shard_map_tuple_axis_name_over_a_2d_mesh():
    mesh = _mesh((2, 4), ("a", "b"))
    d, r = P(("a", "b")), P()
    f = jax.jit(
        jax.shard_map(
            lambda x, m, dy, s, b: _local_step(x, m, dy, s, b, axis_name=("a", "b")),
            mesh=mesh,
            in_specs=(d, d, d, r, r),
            out_specs={"y": d, "dx": d, "mean": r, "var": r, "dscale": r, "dbias": r},
        )
    )
    x, m, dy = _put(mesh, d, X.reshape(-1, C), MASK.reshape(-1, 1), DY.reshape(-1, C))
    _check(f(x, m, dy, SCALE, BIAS))


def test_plain_jit_on_a_sharded_batch_is_global():
    """No axis_name: under jax.jit the batch is one logical array, its statistics are global."""
    mesh = _mesh()
    x, m, dy = _put(mesh, P("data"), X.reshape(-1, C), MASK.reshape(-1, 1), DY.reshape(-1, C))
    f = jax.jit(lambda x, m, dy, s, b: _local_step(x, m, dy, s, b, axis_name=None))
    got = f(x, m, dy, SCALE, BIAS)
    assert got["y"].sharding.is_equivalent_to(x.sharding, 2)
    _check(got)
    mom = jax.jit(lambda x, m: jaxbn.moments(x, mask=m))(x, m)
    np.testing.assert_allclose(mom.count, np.full(C, VALID.sum()))


# ----------------------------------------------------------------------------- groups


GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]


def _per_group_expected():
    halves = [_expected(*(a[g] for a in (X, MASK, DY)), SCALE, BIAS) for g in (slice(0, 4), slice(4, 8))]
    return halves


@pytest.mark.parametrize("strategy", ["gather", "psum"])
def test_pmap_axis_index_groups_match_per_group_results(strategy):
    f = jax.pmap(
        lambda *a: _local_step(*a, axis_name="i", axis_index_groups=GROUPS, strategy=strategy),
        axis_name="i",
        in_axes=(0, 0, 0, None, None),
    )
    got = f(X, MASK, DY, SCALE, BIAS)
    for g, want in zip(GROUPS, _per_group_expected(), strict=True):
        _check({k: np.asarray(v)[g] for k, v in got.items()}, want, per_device_params=True)


def test_shard_map_inner_mesh_axis_is_the_grouping():
    """Under shard_map, pmap's groups [[0..3], [4..7]] are a (2, 4) mesh with the statistics over the inner axis."""
    mesh = _mesh((2, 4), ("groups", "data"))
    d, r = P(("groups", "data")), P()
    per_group = P("groups")  # stats and param grads: one value per group
    f = jax.jit(
        jax.shard_map(
            lambda x, m, dy, s, b: jax.tree.map(
                lambda v: v[None] if v.ndim == 1 else v, _local_step(x, m, dy, s, b, axis_name="data")
            ),
            mesh=mesh,
            in_specs=(d, d, d, r, r),
            out_specs={"y": d, "dx": d, "mean": per_group, "var": per_group, "dscale": per_group, "dbias": per_group},
        )
    )
    x, m, dy = _put(mesh, d, X.reshape(-1, C), MASK.reshape(-1, 1), DY.reshape(-1, C))
    got = {k: np.asarray(v) for k, v in f(x, m, dy, SCALE, BIAS).items()}
    halves = _per_group_expected()
    for i, want in enumerate(halves):
        rows = slice(i * 4 * B, (i + 1) * 4 * B)
        # scale and bias are shared by both groups (in_specs P()): their gradient is the sum over groups.
        want = {**want, **{k: halves[0][k] + halves[1][k] for k in ("dscale", "dbias")}}
        per_group = {k: got[k][i] for k in ("mean", "var", "dscale", "dbias")}
        _check({"y": got["y"][rows], "dx": got["dx"][rows], **per_group}, want)


# ----------------------------------------------------------------------------- exactness, stability, edge cases


def test_flax_averages_per_device_means_and_gets_unequal_masks_wrong():
    import flax.linen as nn

    full_mask = np.broadcast_to(MASK, X.shape)
    # Flax on the same batch with no empty shard: it weights every device equally.
    valid = np.broadcast_to((np.arange(B)[None, :, None] < np.maximum(VALID, 1)[:, None, None]), X.shape)
    want = _expected(X, valid[..., :1], DY, SCALE, BIAS)

    def flax_step(x, m):
        module = nn.BatchNorm(use_running_average=False, axis_name="i", momentum=MOMENTUM, use_fast_variance=False)
        variables = module.init(jax.random.key(0), x)
        _, upd = module.apply(variables, x, mask=m, mutable=["batch_stats"])
        return upd["batch_stats"]["mean"]

    def jaxbn_step(x, m):
        return jaxbn.batch_norm(x, jaxbn.init_stats(C), training=True, axis_name="i", mask=m, momentum=MOMENTUM)[1].mean

    flax_mean = jax.pmap(flax_step, axis_name="i")(X, valid)[0]
    ours = jax.pmap(jaxbn_step, axis_name="i")(X, valid)[0]
    np.testing.assert_allclose(ours, want["mean"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(flax_mean, want["mean"], rtol=1e-3, atol=1e-3), "flax was expected to be wrong here"
    # Flax's answer is the unweighted average of the per-device means.
    per_device = (X * valid).sum(1) / valid.sum(1)
    np.testing.assert_allclose(flax_mean, (1 - MOMENTUM) * per_device.mean(0), rtol=1e-4)

    # With an empty shard, flax's statistics are NaN everywhere; jaxbn's are exact.
    flax_nan = jax.pmap(flax_step, axis_name="i")(X, full_mask)
    assert np.all(np.isnan(np.asarray(flax_nan)))
    np.testing.assert_allclose(jax.pmap(jaxbn_step, axis_name="i")(X, full_mask)[0], EXPECTED["mean"], rtol=1e-5)


def test_empty_shards_poison_nothing():
    """Device 3 holds no valid entry (in every test here); a batch with none at all is harmless too."""
    f = jax.pmap(lambda *a: _local_step(*a, axis_name="i"), axis_name="i", in_axes=(0, 0, 0, None, None))
    assert VALID[3] == 0
    _check(f(X, MASK, DY, SCALE, BIAS), per_device_params=True)  # includes: everything finite
    # Whatever an empty shard holds in its masked entries stays out of the statistics.
    x = X.copy()
    x[3] = np.nan
    x[1, 1:] = np.inf
    m = jax.pmap(lambda x, k: jaxbn.moments(x, mask=k, axis_name="i"), axis_name="i")(x, MASK)
    np.testing.assert_allclose(m.mean[0], ref.moments(X.reshape(-1, C), mask=MASK.reshape(-1, 1))[0], rtol=1e-5)
    assert np.all(np.isfinite(m.var))
    # No valid entry on any device: the running stats keep their values, nothing is NaN.
    got = f(X, np.zeros_like(MASK), DY, SCALE, BIAS)
    for k, v in got.items():
        assert np.all(np.isfinite(np.asarray(v))), k
    np.testing.assert_array_equal(np.asarray(got["mean"]), np.zeros((D, C)))
    np.testing.assert_array_equal(np.asarray(got["var"]), np.ones((D, C)))


@pytest.mark.parametrize("strategy", ["gather", "psum"])
def test_large_offset_is_stable_across_devices(strategy):
    """float32 1e4 + N(0, 1) split over 8 devices: var within 1e-3 relative from the first step."""
    rng = np.random.default_rng(1)
    x = (1e4 + rng.normal(size=(D, 64, C))).astype(np.float32)
    x[:, :, 1] += np.arange(D)[:, None] * 0.5  # device means differ too
    true_var = ref.moments(x.reshape(-1, C))[1]

    def step(x):
        m = jaxbn.moments(x, axis_name="i", strategy=strategy)
        _, new = jaxbn.batch_norm(x, jaxbn.init_stats(C), training=True, axis_name="i", momentum=0.0, strategy=strategy)
        return m.var, new.var

    mvar, svar = jax.pmap(step, axis_name="i")(x)
    np.testing.assert_allclose(mvar[0], true_var, rtol=1e-3)
    np.testing.assert_allclose(svar[0], true_var, rtol=1e-3)


def test_one_entry_per_device():
    x, dy = X[:, :1], DY[:, :1]
    mask = np.ones((D, 1, 1), bool)
    want = _expected(x, mask, dy, SCALE, BIAS)
    f = jax.pmap(lambda *a: _local_step(*a, axis_name="i"), axis_name="i", in_axes=(0, 0, 0, None, None))
    _check(f(x, mask, dy, SCALE, BIAS), want, per_device_params=True, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["gather", "psum"])
def test_moments_unequal_counts(strategy):
    m = jax.pmap(lambda x, k: jaxbn.moments(x, mask=k, axis_name="i", strategy=strategy), axis_name="i")(X, MASK)
    mean, var, n = ref.moments(X.reshape(-1, C), mask=MASK.reshape(-1, 1))
    np.testing.assert_allclose(m.mean[0], mean, rtol=1e-5)
    np.testing.assert_allclose(m.var[0], var, rtol=1e-5)
    np.testing.assert_array_equal(m.count[0], n)


def test_unbound_axis_name_under_jit_names_the_transformations():
    with pytest.raises(NameError, match=r"axis_name='nope'.*jax\.pmap.*jax\.vmap.*jax\.shard_map"):
        jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_stats(C), training=True, axis_name="nope"))(X[0])
    with pytest.raises(NameError, match=r"'nope' is not bound"):
        jax.pmap(lambda x: jaxbn.moments(x, axis_name=("i", "nope")), axis_name="i")(X)


# ----------------------------------------------------------------------------- Flax modules


def test_linen_module_under_pmap_matches_concatenated_batch():
    linen = pytest.importorskip("jaxbn.linen")
    module = linen.BatchNorm(use_running_average=False, axis_name="i", momentum=MOMENTUM)
    variables = module.init(jax.random.key(0), X[0])
    variables = {"params": {"scale": SCALE, "bias": BIAS}, "batch_stats": variables["batch_stats"]}

    def step(x, m, dy):
        def loss(x, params):
            y, upd = module.apply({**variables, "params": params}, x, mask=m, mutable=["batch_stats"])
            return jnp.sum(y * dy), (y, upd["batch_stats"])

        (_, (y, st)), (dx, dp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, variables["params"])
        return {"y": y, "mean": st["mean"], "var": st["var"], "dx": dx, "dscale": dp["scale"], "dbias": dp["bias"]}

    _check(jax.pmap(step, axis_name="i")(X, MASK, DY), per_device_params=True)


def test_nnx_module_under_pmap_matches_concatenated_batch():
    jnnx = pytest.importorskip("jaxbn.nnx")
    from flax import nnx

    model = jnnx.BatchNorm(C, axis_name="i", momentum=MOMENTUM, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def step(state, x, m):
        model = nnx.merge(graphdef, state)
        y = model(x, mask=m)
        return y, model.mean[...], model.var[...]

    y, mean, var = jax.pmap(step, axis_name="i", in_axes=(None, 0, 0))(state, X, MASK)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, C), ref.normalize(
        X.reshape(-1, C), *ref.moments(X.reshape(-1, C), mask=MASK.reshape(-1, 1))[:2]), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(mean[0], EXPECTED["mean"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(var[5], EXPECTED["var"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("strategy", ["gather", "psum"])
def test_moments_under_shard_map_replicated_and_differentiable(strategy):
    """moments() leaves shard_map as a replicated value (out_specs=P()), and autodiff goes through it."""
    mesh = _mesh()
    d, r = P("data"), P()
    f = jax.shard_map(
        lambda x, m: jaxbn.moments(x, mask=m, axis_name="data", strategy=strategy), mesh=mesh,
        in_specs=(d, d), out_specs=jaxbn.Moments(r, r, r),
    )
    x, m = _put(mesh, d, X.reshape(-1, C), MASK.reshape(-1, 1))
    got = jax.jit(f)(x, m)
    mean, var, n = ref.moments(X.reshape(-1, C), mask=MASK.reshape(-1, 1))
    np.testing.assert_allclose(got.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(got.var, var, rtol=1e-5)
    # d sum(var) / dx = 2 (x - mean) / n on valid entries, 0 elsewhere.
    dx = jax.jit(jax.grad(lambda x: jnp.sum(f(x, m).var)))(x)
    want = np.where(MASK.reshape(-1, 1), 2 * (X.reshape(-1, C) - mean) / n, 0.0)
    np.testing.assert_allclose(np.asarray(dx), want, rtol=1e-4, atol=1e-5)


def test_batch_renorm_under_shard_map_matches_pmap():
    stats = jaxbn.RunningStats(jnp.full(C, 2.5), jnp.full(C, 3.0), jnp.zeros((), jnp.int32))

    def local(x, m, axis_name):
        y, new = jaxbn.batch_renorm(x, stats, SCALE, BIAS, training=True, axis_name=axis_name, mask=m, r_max=1.5)
        return y, new.mean, new.var

    mesh = _mesh()
    d, r = P("data"), P()
    sm = jax.jit(jax.shard_map(lambda x, m: local(x, m, "data"), mesh=mesh, in_specs=(d, d), out_specs=(d, r, r)))
    got = sm(*_put(mesh, d, X.reshape(-1, C), MASK.reshape(-1, 1)))
    want = jax.jit(local, static_argnums=2)(X.reshape(-1, C), MASK.reshape(-1, 1), None)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    e = _renorm_expected(2.5, 3.0, r_max=1.5, d_max=5.0)  # and against float64 from the definition
    for g, w in zip(got, (e["y"], e["mean"], e["var"]), strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- reliability (docs/contract.md)

_SYNC_ROWS = 16


def _sync_moments_fn(strategy):
    mesh = _mesh()
    d, r = P("data"), P()
    return mesh, jax.jit(
        jax.shard_map(
            lambda x, m: tuple(jaxbn.moments(x, mask=m, axis_name="data", strategy=strategy)),
            mesh=mesh, in_specs=(d, d), out_specs=(r, r, r),
        )
    )


_SYNC_FNS = {s: _sync_moments_fn(s) for s in ("gather", "psum")}


@settings(max_examples=25, deadline=None)
@given(
    strategy=st.sampled_from(["gather", "psum"]),
    valid=st.lists(st.integers(0, _SYNC_ROWS), min_size=D, max_size=D).filter(lambda v: sum(v) > 0),
    layout=st.sampled_from(["front", "back", "strided"]),
    log_offset=st.floats(3.0, 6.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_sync_variance_stable_whatever_the_per_device_masks(strategy, valid, layout, log_offset, seed):
    """8 devices with uneven valid counts (0, 1, ... 16 each), placed anywhere, offsets 1e3..1e6.

    Against float64 moments of the concatenated batch's valid entries: var to 1e-3 relative.
    """
    rng = np.random.default_rng(seed)
    x = (10.0**log_offset + rng.normal(size=(D * _SYNC_ROWS, C))).astype(np.float32)
    rows = np.zeros((D, _SYNC_ROWS), bool)
    for dev, k in enumerate(valid):
        if layout == "front":
            rows[dev, :k] = True
        elif layout == "back":
            rows[dev, _SYNC_ROWS - k:] = True
        else:
            rows[dev, rng.permutation(_SYNC_ROWS)[:k]] = True
    mask = rows.reshape(-1, 1)
    mesh, f = _SYNC_FNS[strategy]
    xs, ms = _put(mesh, P("data"), x, mask)
    mean, var, count = f(xs, ms)
    want_mean, want_var, want_n = ref.moments(x, mask=mask)
    np.testing.assert_array_equal(count, want_n)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("where", ["one_device_some_features", "every_device_all_features"])
def test_non_finite_batch_under_sync_keeps_running_stats(where):
    """inf/NaN on one device poisons those features' global moments: their running stats keep their values."""
    x = X.copy()
    if where == "one_device_some_features":
        x[5, 0, 1] = np.nan  # device 5 holds valid entries (VALID[5] == 4)
    else:
        x[:, 0, :] = np.inf
    stats = jaxbn.RunningStats(jnp.array([0.5, -0.5, 0.25]), jnp.array([2.0, 3.0, 4.0]), jnp.array(2))
    f = jax.pmap(
        lambda x, m: jaxbn.batch_norm(x, stats, training=True, mask=m, axis_name="i", momentum=MOMENTUM)[1],
        axis_name="i",
    )
    new = f(x, MASK)
    if where == "one_device_some_features":
        mean, var, n = ref.moments(X.reshape(-1, C), mask=MASK.reshape(-1, 1))
        want_mean, want_var, want_count = ref.update(stats.mean, stats.var, 2, mean, var, n, MOMENTUM)
        want_mean[1], want_var[1] = stats.mean[1], stats.var[1]
    else:
        want_mean, want_var, want_count = np.asarray(stats.mean), np.asarray(stats.var), 2
    for dev in range(D):
        np.testing.assert_allclose(new.mean[dev], want_mean, rtol=1e-5)
        np.testing.assert_allclose(new.var[dev], want_var, rtol=1e-5)
        assert int(new.count[dev]) == want_count


@pytest.mark.parametrize("strategy", ["gather", "psum"])
@pytest.mark.parametrize("masked", [False, True])
def test_float64_moments_across_devices_under_x64(strategy, masked):
    """Under jax x64, float64 data synced over 8 devices: float64 moments to float64 rounding (the psum path
    packed float64 sums next to float32 counts, a promotion error under strict promotion)."""
    with jax.enable_x64(True):
        x = X.astype(np.float64) + 1.0 / 3.0
        mask = MASK if masked else None
        f = jax.vmap(lambda xb, mb: jaxbn.moments(xb, axis_name="d", strategy=strategy, mask=mb), axis_name="d",
                     in_axes=(0, 0 if masked else None))
        got = f(x, mask)
        mean, var, n = ref.moments(x.reshape(-1, C), mask=None if mask is None else mask.reshape(-1, 1))
        assert got.mean.dtype == got.var.dtype == jnp.float64
        np.testing.assert_allclose(got.mean[0], mean, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(got.var[0], var, rtol=1e-13)
        np.testing.assert_array_equal(got.count[0], n)
