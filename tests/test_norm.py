"""normalize, batch_norm and batch_renorm against float64 numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from tests import reference as ref

LAYOUTS = [((64, 8), -1), ((4, 5, 5, 6), -1), ((4, 6, 5, 5), 1), ((2, 3, 3, 3, 4), -1), ((5, 3, 4), (1, 2))]


def _data(shape, axis, seed=0, offset=1.5):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 2 + offset).astype(np.float32)
    feat = tuple(shape[a] for a in ref.as_axes(len(shape), axis)[0])
    scale = (rng.random(feat) + 0.5).astype(np.float32)
    bias = rng.normal(size=feat).astype(np.float32)
    return x, scale, bias, feat


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_normalize(maybe_jit, shape, axis):
    x, scale, bias, feat = _data(shape, axis)
    mean, var = np.full(feat, 0.5, np.float32), np.full(feat, 2.0, np.float32)
    y = maybe_jit(functools.partial(jaxbn.normalize, axis=axis, epsilon=1e-3))(x, mean, var, scale, bias)
    np.testing.assert_allclose(y, ref.normalize(x, mean, var, scale, bias, axis, 1e-3), rtol=1e-5, atol=1e-5)
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_training(maybe_jit, shape, axis, masked):
    x, scale, bias, feat = _data(shape, axis)
    mask = (np.random.default_rng(9).random(shape[:1] + (1,) * (len(shape) - 1)) > 0.3) if masked else None
    stats = jaxbn.init_stats(feat)
    f = maybe_jit(lambda x, s, sc, b, m: jaxbn.batch_norm(x, s, sc, b, training=True, axis=axis, mask=m, momentum=0.9))
    y, new = f(x, stats, scale, bias, mask)
    mean, var, n = ref.moments(x, axis, mask)
    np.testing.assert_allclose(y, ref.normalize(x, mean, var, scale, bias, axis), rtol=1e-4, atol=1e-4)
    em, ev, _ = ref.update(np.zeros(feat), np.ones(feat), 0, mean, var, n, 0.9)
    np.testing.assert_allclose(new.mean, em, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, ev, rtol=1e-5)
    assert int(new.count) == 1


def test_batch_norm_inference_uses_running_stats(maybe_jit):
    x, scale, bias, feat = _data((10, 4), -1)
    stats = jaxbn.RunningStats(jnp.arange(4.0), jnp.arange(1.0, 5.0), jnp.array(5))
    y, same = maybe_jit(lambda x, s: jaxbn.batch_norm(x, s, scale, bias, training=False))(x, stats)
    np.testing.assert_allclose(y, ref.normalize(x, np.arange(4.0), np.arange(1.0, 5.0), scale, bias), rtol=1e-5)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, stats)


@pytest.mark.parametrize("shape, axis", LAYOUTS[:3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("via", ["batch_norm", "moments+normalize"])
def test_batch_norm_gradients(maybe_jit, shape, axis, masked, via):
    """The closed-form rule and plain autodiff through jaxbn.moments both match the numpy closed form."""
    x, scale, bias, feat = _data(shape, axis, seed=1)
    dy = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    mask = (np.random.default_rng(3).random(shape[:1] + (1,) * (len(shape) - 1)) > 0.3) if masked else None

    def loss(x, sc, b):
        if via == "batch_norm":
            y, _ = jaxbn.batch_norm(x, jaxbn.init_stats(feat), sc, b, training=True, axis=axis, mask=mask)
        else:
            m = jaxbn.moments(x, axis=axis, mask=mask)
            y = jaxbn.normalize(x, m.mean, m.var, sc, b, axis=axis)
        return jnp.sum(y * dy)

    dx, dsc, db = maybe_jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
    ex, esc, eb = ref.bn_train_grads(x, dy, scale, axis, mask)
    np.testing.assert_allclose(dx, ex, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dsc, esc, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, eb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_check_grads_fwd_and_rev(masked):
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x = rng.normal(size=(6, 3, 2))
        scale, bias = rng.random(2) + 0.5, rng.normal(size=2)
        mask = np.array([1, 1, 0, 1, 0, 1], bool)[:, None, None] if masked else None

        def f(x, sc, b):
            y, _ = jaxbn.batch_norm(x, jaxbn.init_stats(2, jnp.float64), sc, b, training=True, mask=mask)
            return jnp.sin(y)

        # second order through the closed-form rule too (statistics_of carries the moments' dependence)
        check_grads(f, (x, scale, bias), order=2, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


def test_fused_keeps_one_input_sized_residual():
    x, scale, bias, feat = _data((32, 8, 8, 16), -1)

    def f(x, sc, b):
        return jaxbn.batch_norm(x, jaxbn.init_stats(feat), sc, b, training=True)[0]

    _, vjp = jax.vjp(f, x, scale, bias)
    saved = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp) if hasattr(leaf, "nbytes"))
    assert saved <= x.nbytes * 1.01


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
    x, scale, bias, feat = _data((128, 8), -1)
    xh = jnp.asarray(x, dtype)
    y, new = jaxbn.batch_norm(xh, jaxbn.init_stats(feat), scale, bias, training=True)
    assert y.dtype == dtype and new.mean.dtype == jnp.float32 and new.var.dtype == jnp.float32
    xf = np.asarray(xh.astype(jnp.float32))
    mean, var, _ = ref.moments(xf, -1)
    np.testing.assert_allclose(y.astype(jnp.float32), ref.normalize(xf, mean, var, scale, bias), atol=3e-2, rtol=1e-2)
    dy = ref.normal(8, x.shape)

    def loss(x):
        y = jaxbn.batch_norm(x, jaxbn.init_stats(feat), scale, bias, training=True)[0]
        return jnp.sum(y.astype(jnp.float32) * dy)

    g = jax.grad(loss)(xh)
    assert g.dtype == dtype
    dx_ref, _, _ = ref.bn_train_grads(xf, dy, scale)
    # the cotangent is rounded to the half dtype once, and so is dx
    np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), dx_ref, rtol=2e-2, atol=2e-2 * np.abs(dx_ref).max())


def test_output_dtype_override():
    x, scale, bias, feat = _data((16, 4), -1)
    y, _ = jaxbn.batch_norm(
        jnp.asarray(x, jnp.bfloat16), jaxbn.init_stats(feat), scale, bias, training=True, dtype=jnp.float32
    )
    assert y.dtype == jnp.float32


def test_complex_input_follows_flax():
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(12, 3)) + 1j * rng.normal(size=(12, 3))).astype(np.complex64)
    y, new = jaxbn.batch_norm(x, jaxbn.init_stats(3), training=True, momentum=0.5)
    mean, var, _ = ref.moments(x, -1)
    np.testing.assert_allclose(y, ref.normalize(x, mean, var), rtol=1e-4, atol=1e-5)
    assert new.mean.dtype == jnp.complex64 and new.var.dtype == jnp.float32
    np.testing.assert_allclose(new.mean, 0.5 * mean, rtol=1e-5, atol=1e-6)


def test_all_masked_batch_keeps_stats_and_is_finite():
    """No valid entry: stats (count included) unchanged; y and its gradient are those of mean 0, var 0."""
    x, scale, bias, feat = _data((8, 3), -1)
    stats = jaxbn.RunningStats(jnp.full(3, 2.0), jnp.full(3, 3.0), jnp.array(4))
    none = np.zeros((8, 1), bool)
    y, new = jaxbn.batch_norm(x, stats, scale, bias, training=True, mask=none)
    np.testing.assert_allclose(y, ref.normalize(x, np.zeros(3), np.zeros(3), scale, bias), rtol=1e-5)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, stats)
    g = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, stats, scale, bias, training=True, mask=none)[0] ** 2))(x)
    dx_ref, _, _ = ref.bn_train_grads(x, 2 * np.asarray(y, np.float64), scale, mask=none)
    np.testing.assert_allclose(g, dx_ref, rtol=1e-4)


def test_stats_passed_in_are_not_mutated():
    x, scale, bias, feat = _data((8, 3), -1)
    stats = jaxbn.init_stats(3)
    x_before = x.copy()
    jax.jit(lambda x, s: jaxbn.batch_norm(x, s, scale, bias, training=True))(x, stats)
    np.testing.assert_array_equal(stats.mean, 0.0)
    np.testing.assert_array_equal(stats.var, 1.0)
    np.testing.assert_array_equal(x, x_before)


def test_composes_with_vmap_remat_scan():
    x, scale, bias, feat = _data((5, 16, 3), -1)  # 5 independent batches
    stats = jaxbn.init_stats(3)

    def step(s, xb):
        y, s = jax.checkpoint(lambda xb, s: jaxbn.batch_norm(xb, s, scale, bias, training=True, momentum=0.5))(xb, s)
        return s, y

    final, ys = jax.lax.scan(step, stats, x)
    vm, _ = jax.vmap(lambda xb: jaxbn.batch_norm(xb, stats, scale, bias, training=True))(x)
    np.testing.assert_allclose(ys, vm, rtol=1e-5, atol=1e-5)
    em, ev = np.zeros(3), np.ones(3)
    for b in x:
        mean, var, n = ref.moments(b, -1)
        em, ev, _ = ref.update(em, ev, 0, mean, var, n, 0.5)
    np.testing.assert_allclose(final.mean, em, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final.var, ev, rtol=1e-5)
    g = jax.grad(lambda x: jnp.sum(jax.lax.scan(step, stats, x)[1] ** 3))(x)
    for b, yb, gb in zip(x, np.asarray(ys, np.float64), g, strict=True):  # each batch: the numpy closed form
        np.testing.assert_allclose(gb, ref.bn_train_grads(b, 3 * yb**2, scale)[0], rtol=1e-3, atol=1e-3)


def _renorm_ref(x, rmean, rvar, scale, bias, r_max, d_max, eps=1e-5):
    mean, var, _ = ref.moments(x, -1)
    sb, s = np.sqrt(var + eps), np.sqrt(rvar + eps)
    r = np.clip(sb / s, 1 / r_max, r_max)
    d = np.clip((mean - rmean) / s, -d_max, d_max)
    return ((x - mean) / sb * r + d) * scale + bias


@pytest.mark.parametrize("r_max, d_max", [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)])
def test_batch_renorm(maybe_jit, r_max, d_max):
    x, scale, bias, feat = _data((64, 4), -1, offset=3.0)
    stats = jaxbn.RunningStats(jnp.array([0.0, 3.0, 2.0, 5.0]), jnp.array([1.0, 4.0, 0.25, 9.0]), jnp.array(2))
    f = maybe_jit(
        lambda x, s: jaxbn.batch_renorm(x, s, scale, bias, training=True, r_max=r_max, d_max=d_max, momentum=0.8)
    )
    y, new = f(x, stats)
    np.testing.assert_allclose(
        y,
        _renorm_ref(x, np.asarray(stats.mean), np.asarray(stats.var), scale, bias, r_max, d_max),
        rtol=1e-4,
        atol=1e-4,
    )
    mean, var, n = ref.moments(x, -1)
    em, ev, _ = ref.update(stats.mean, stats.var, 2, mean, var, n, 0.8)
    np.testing.assert_allclose(new.mean, em, rtol=1e-5)
    np.testing.assert_allclose(new.var, ev, rtol=1e-5)
    y_inf, same = jaxbn.batch_renorm(x, stats, scale, bias, training=False)
    np.testing.assert_allclose(y_inf, ref.normalize(x, stats.mean, stats.var, scale, bias), rtol=1e-5, atol=1e-5)


def test_batch_renorm_gradient_treats_r_d_as_constants():
    """With r, d stop-gradiented, dy/dx is batch norm's gradient with scale * r."""
    x, scale, bias, feat = _data((32, 3), -1, offset=0.0)
    stats = jaxbn.RunningStats(jnp.array([0.5, -0.5, 0.0]), jnp.array([9.0, 0.01, 4.0]), jnp.array(1))
    dy = np.random.default_rng(6).normal(size=x.shape)
    g = jax.grad(lambda x: jnp.sum(jaxbn.batch_renorm(x, stats, scale, bias, training=True)[0] * dy))(x)
    _, var, _ = ref.moments(x, -1)
    r = np.clip(np.sqrt(var + 1e-5) / np.sqrt(np.asarray(stats.var) + 1e-5), 1 / 3, 3)
    ex, _, _ = ref.bn_train_grads(x, dy, scale * r)
    np.testing.assert_allclose(g, ex, rtol=1e-3, atol=1e-4)


def test_jvp_works_on_fused_path():
    """<J t, dy> equals <t, J^T dy>, J^T dy from the numpy closed form; and it agrees with plain autodiff."""
    x, scale, bias, feat = _data((16, 3), -1)
    rng = np.random.default_rng(7)
    t = rng.normal(size=x.shape).astype(np.float32)
    dy = rng.normal(size=x.shape)
    f = lambda x: jaxbn.batch_norm(x, jaxbn.init_stats(3), scale, bias, training=True)[0]  # noqa: E731
    g = lambda x: jaxbn.normalize(x, *jaxbn.moments(x)[:2], scale, bias)  # noqa: E731  (plain autodiff)
    jt = np.asarray(jax.jvp(f, (x,), (t,))[1], np.float64)
    dx_ref, _, _ = ref.bn_train_grads(x, dy, scale)
    np.testing.assert_allclose(np.sum(jt * dy), np.sum(t * dx_ref), rtol=1e-4)
    np.testing.assert_allclose(jt, jax.jvp(g, (x,), (t,))[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("renorm", [False, True])
def test_mixed_parameter_dtypes_under_strict_promotion(renorm):
    """bf16 scale/bias with float32 x (a module's param_dtype): no implicit promotion, values as the reference.

    conftest.py sets jax_numpy_dtype_promotion="strict" (equinox's and haiku's test setting).
    """
    x, scale, bias, feat = _data((16, 4), -1)
    sc, b = jnp.asarray(scale, jnp.bfloat16), jnp.asarray(bias, jnp.bfloat16)
    fn = jaxbn.batch_renorm if renorm else jaxbn.batch_norm
    y, _ = fn(x, jaxbn.init_stats(feat), sc, b, training=True, **({"r_max": 1.0, "d_max": 0.0} if renorm else {}))
    g = jax.grad(lambda s: jnp.sum(fn(x, jaxbn.init_stats(feat), s, b, training=True)[0]))(sc)
    assert y.dtype == jnp.float32 and g.dtype == jnp.bfloat16
    mean, var, _ = ref.moments(x, -1)
    np.testing.assert_allclose(y, ref.normalize(x, mean, var, np.asarray(sc, np.float32), np.asarray(b, np.float32)),
                               rtol=1e-4, atol=1e-4)


def test_complex_scale_keeps_its_imaginary_part():
    """A complex scale (NNX with dtype=complex64) multiplies as complex, in training and inference."""
    rng = np.random.default_rng(11)
    x = (rng.normal(size=(12, 3)) + 1j * rng.normal(size=(12, 3))).astype(np.complex64)
    scale = (1.0 + 0.5j) * np.ones(3, np.complex64)
    y, new = jaxbn.batch_norm(x, jaxbn.init_stats(3), scale, training=True)
    mean, var, _ = ref.moments(x, -1)
    np.testing.assert_allclose(y, ref.normalize(x, mean, var, scale), rtol=1e-4, atol=1e-5)
    y_inf, _ = jaxbn.batch_norm(x, new, scale, training=False)
    np.testing.assert_allclose(y_inf, ref.normalize(x, new.mean, new.var, scale), rtol=1e-4, atol=1e-5)
