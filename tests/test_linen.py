"""jaxbn.linen.BatchNorm: a drop-in for flax.linen.BatchNorm, plus its extras."""

import dataclasses
import doctest
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbn.linen
from tests import reference as ref
from tests.reference import bernoulli as _bernoulli
from tests.reference import normal as _normal

BN = jaxbn.linen.BatchNorm
F32 = dict(rtol=2e-5, atol=2e-5)



def _fields(cls):
    return [(f.name, f.default) for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _flax_promotion():
    """flax's own BatchNorm promotes implicitly: run the reference under standard promotion (ours runs strict)."""
    return jax.numpy_dtype_promotion("standard")


def _close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **(kw or F32)), a, b)


# ---------------------------------------------------------------- drop-in surface


def test_fields_are_flax_fields_in_order_then_extras():
    ours, theirs = _fields(BN), _fields(nn.BatchNorm)
    assert ours[: len(theirs)] == theirs
    assert ours[len(theirs):] == [
        ("renorm", False), ("renorm_r_max", 3.0), ("renorm_d_max", 5.0), ("virtual_batch_size", None),
        ("unbiased", False), ("strategy", "auto"),
    ]
    assert BN.__name__ == "BatchNorm"
    params = inspect.signature(BN.__call__).parameters
    assert list(params) == list(inspect.signature(nn.BatchNorm.__call__).parameters)


def test_positional_construction_and_auto_names():
    # flax code builds BatchNorm positionally: (use_running_average, axis, momentum, epsilon, ...)
    bn = BN(False, -1, 0.9, 1e-3, None, jnp.float32, True, True)
    assert (bn.use_running_average, bn.momentum, bn.epsilon) == (False, 0.9, 1e-3)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return BN(use_running_average=False)(nn.Dense(3)(x))

    v = Net().init(jax.random.key(0), jnp.ones((4, 2)))
    assert set(v["batch_stats"]) == {"BatchNorm_0"}
    assert set(v["params"]) == {"Dense_0", "BatchNorm_0"}


def test_flax_only_arguments_are_accepted():
    x = _normal(0, (6, 3))
    for kw in [dict(use_fast_variance=True), dict(force_float32_reductions=False)]:
        v = BN(use_running_average=False, **kw).init(jax.random.key(0), x)
        assert v["batch_stats"]["mean"].dtype == jnp.float32


def test_missing_mode_raises_like_flax():
    x = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="use_running_average"):
        BN().init(jax.random.key(0), x)


def test_flax_docstring_example_runs_on_ours():
    """flax's own BatchNorm example, with nn.BatchNorm swapped for ours, gives flax's printed results."""
    doc = nn.BatchNorm.__doc__.replace("nn.BatchNorm(", "jaxbn.linen.BatchNorm(")
    assert "jaxbn.linen.BatchNorm(" in doc
    test = doctest.DocTestParser().get_doctest(doc, {"jaxbn": jaxbn}, "BatchNorm", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False) == (0, len(test.examples))


# ---------------------------------------------------------------- parity with flax

CASES = [((16, 5), -1, False), ((16, 5), -1, True), ((4, 3, 3, 5), -1, True), ((4, 5, 3, 3), 1, True)]


@pytest.mark.parametrize("shape, axis, masked", CASES, ids=["NC", "NC-mask", "NHWC-mask", "NCHW-mask"])
def test_matches_flax(shape, axis, masked):
    kp = jax.random.key(0)
    x = 2.0 + 3.0 * _normal(0, shape)
    mask = _bernoulli(1, 0.7, shape) if masked else None
    theirs = nn.BatchNorm(use_running_average=False, axis=axis, momentum=0.9, use_fast_variance=False)
    ours = BN(use_running_average=False, axis=axis, momentum=0.9)
    v = jax.jit(theirs.init)(kp, x)
    v0 = jax.jit(ours.init)(kp, x)
    _close(v, v0, rtol=0, atol=0)
    # non-trivial parameters so the affine part is exercised
    v = {"params": jax.tree.map(lambda p: p + _normal(2, p.shape), v["params"]),
         "batch_stats": v["batch_stats"]}

    def loss(mod, params, x):
        y, upd = mod.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mask=mask,
                           mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * y), (y, upd)

    (lt, (yt, ut)), gt = jax.jit(jax.value_and_grad(lambda p, x: loss(theirs, p, x), (0, 1), has_aux=True))(
        v["params"], x)
    (lo, (yo, uo)), go = jax.jit(jax.value_and_grad(lambda p, x: loss(ours, p, x), (0, 1), has_aux=True))(
        v["params"], x)
    _close(yo, yt)
    _close(uo, ut)
    _close(go, gt, rtol=1e-4, atol=1e-4)
    # inference with the updated stats
    vi = {"params": v["params"], **ut}
    inf = dict(use_running_average=True)
    _close(jax.jit(ours.clone(**inf).apply)(vi, x), jax.jit(theirs.clone(**inf).apply)(vi, x))


def test_flax_batch_norm_case():  # ported from flax's linen_test.py::test_batch_norm
    key2 = jax.random.key(0)
    x = _normal(0, (4, 3, 2))
    model = BN(momentum=0.9, use_running_average=False)
    y, initial_params = model.init_with_output(key2, x)
    np.testing.assert_allclose(y.mean((0, 1)), np.zeros(2), atol=1e-4)
    np.testing.assert_allclose(y.var((0, 1)), np.ones(2), rtol=1e-4)
    y, vars_out = model.apply(initial_params, x, mutable=["batch_stats"])
    ema = vars_out["batch_stats"]
    np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1)), atol=1e-4)
    np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1)), rtol=1e-4)


def test_flax_complex_case():  # ported from flax's linen_test.py::test_batch_norm_complex
    key2 = jax.random.key(0)
    x = _normal(0, (4, 3, 2), np.complex64)
    model = BN(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
    y, initial_params = model.init_with_output(key2, x)
    mean = y.mean((0, 1))
    np.testing.assert_allclose(mean, np.zeros(2), atol=1e-4)
    np.testing.assert_allclose(y.var((0, 1)), np.ones(2), rtol=1e-4)
    assert mean.dtype == jnp.complex64
    y, vars_out = model.apply(initial_params, x, mutable=["batch_stats"])
    ema = vars_out["batch_stats"]
    assert ema["mean"].dtype == jnp.complex64  # complex running mean, as flax
    np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1)), atol=1e-4)
    np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1)), rtol=1e-4)
    theirs = nn.BatchNorm(momentum=0.9, use_running_average=False, dtype=jnp.complex64, use_fast_variance=False)
    with _flax_promotion():
        yt, vt = theirs.apply(initial_params, x, mutable=["batch_stats"])
    _close(y, yt)
    _close(vars_out, vt)


def test_flax_multi_init_case():  # ported from flax's linen_test.py::test_batch_norm_multi_init
    def foo(cls, **kw):
        class Foo(nn.Module):
            @nn.compact
            def __call__(self, x):
                norm = cls(name="norm", use_running_average=False, axis_name="batch", **kw)
                x = norm(x)
                return x, norm(x)

        return Foo()

    x = _normal(1, (2, 4))
    (y1, y2), variables = foo(BN).init_with_output(jax.random.key(0), x)  # axis_name unbound: unused in init
    (t1, t2), _ = foo(nn.BatchNorm, use_fast_variance=False).init_with_output(jax.random.key(0), x)
    _close((y1, y2), (t1, t2))
    _close(variables["batch_stats"]["norm"], {"mean": jnp.zeros(4), "var": jnp.ones(4)}, rtol=0, atol=0)


def test_init_leaves_stats_and_one_value_per_feature_does_not_raise():
    x = 5.0 * jnp.ones((1, 3))
    for mod in [BN(use_running_average=False), nn.BatchNorm(use_running_average=False)]:
        y, v = mod.init_with_output(jax.random.key(0), x)
        np.testing.assert_array_equal(y, jnp.zeros((1, 3)))
        np.testing.assert_array_equal(v["batch_stats"]["var"], jnp.ones(3))
    # training on a single value: mean = x, var = 0, output = bias, zero input gradient (as flax)
    ours, theirs = BN(use_running_average=False, momentum=0.5), nn.BatchNorm(use_running_average=False, momentum=0.5)
    yo, uo = ours.apply(v, x, mutable=["batch_stats"])
    yt, ut = theirs.apply(v, x, mutable=["batch_stats"])
    _close(yo, yt)
    _close(uo, ut)
    g = jax.grad(lambda x: jnp.sum(ours.apply(v, x, mutable=["batch_stats"])[0] ** 2 + x))(x)
    _close(g, jnp.ones_like(x))


@pytest.mark.parametrize(
    "xdtype, dtype, use_scale",
    [(jnp.bfloat16, None, True), (jnp.bfloat16, jnp.bfloat16, True), (jnp.bfloat16, None, False),
     (jnp.float32, jnp.bfloat16, True), (jnp.float16, jnp.float32, True)],
)
def test_output_dtype_follows_flax(xdtype, dtype, use_scale):
    x = _normal(0, (8, 4)).astype(xdtype)
    kw = dict(use_running_average=False, dtype=dtype, use_scale=use_scale, use_bias=use_scale)
    with _flax_promotion():
        v = nn.BatchNorm(**kw).init(jax.random.key(0), x)
        yt, ut = nn.BatchNorm(use_fast_variance=False, **kw).apply(v, x, mutable=["batch_stats"])
    yo, uo = BN(**kw).apply(v, x, mutable=["batch_stats"])
    assert yo.dtype == yt.dtype
    # float64 reference on the (rounded) input; a bf16 output is checked to bf16 rounding only
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    mean, var, n = ref.moments(x64, -1)
    tol = dict(rtol=1e-2, atol=1e-2) if yo.dtype == jnp.bfloat16 else dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(yo.astype(jnp.float32)), ref.normalize(x64, mean, var), **tol)
    _close(yo.astype(jnp.float32), yt.astype(jnp.float32), **tol)
    want_mean, want_var, _ = ref.update(np.zeros(4), np.ones(4), 0, mean, var, n, momentum=0.99)
    _close(uo["batch_stats"], {"mean": want_mean, "var": want_var}, **F32)
    _close(uo, ut, rtol=1e-3, atol=1e-3)
    assert jax.tree.map(lambda a: a.dtype, uo) == jax.tree.map(lambda a: a.dtype, ut)


def test_integer_input_is_promoted_like_flax():
    x = jnp.arange(12).reshape(6, 2)
    v = BN(use_running_average=False).init(jax.random.key(0), x)
    yo = BN(use_running_average=False).apply(v, x, mutable=["batch_stats"])[0]
    with _flax_promotion():
        yt = nn.BatchNorm(use_running_average=False, use_fast_variance=False).apply(v, x, mutable=["batch_stats"])[0]
    assert yo.dtype == yt.dtype
    _close(yo, yt)


# ---------------------------------------------------------------- checkpoints


def test_variables_interchange_both_ways():
    x = _normal(0, (8, 3, 3, 4))
    vt = nn.BatchNorm(use_running_average=False).init(jax.random.key(1), x)
    vo = BN(use_running_average=False).init(jax.random.key(1), x)
    assert jax.tree.structure(vt) == jax.tree.structure(vo)
    # bytes written from one load into the other's template
    vo2 = serialization.from_bytes(vo, serialization.to_bytes(vt))
    vt2 = serialization.from_bytes(vt, serialization.to_bytes(vo))
    _close(vo2, vt, rtol=0, atol=0)
    _close(vt2, vo, rtol=0, atol=0)
    _, upd = BN(use_running_average=False).apply(vt, x, mutable=["batch_stats"])
    trained = {"params": vt["params"], **upd}
    state = serialization.to_state_dict(trained)
    restored = serialization.from_state_dict(vt, state)
    _close(nn.BatchNorm(use_running_average=True).apply(restored, x), BN(use_running_average=True).apply(trained, x))


def test_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    x = _normal(0, (8, 4))
    mod = BN(use_running_average=False, momentum=0.5)
    v = mod.init(jax.random.key(1), x)
    _, upd = mod.apply(v, x, mutable=["batch_stats"])
    trained = {"params": v["params"], **upd}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", trained)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "ckpt", nn.BatchNorm(use_running_average=False).init(jax.random.key(2), x))
    _close(restored, trained, rtol=0, atol=0)
    inf = dict(use_running_average=True)
    _close(nn.BatchNorm(**inf).apply(restored, x), mod.clone(**inf).apply(trained, x))


# ---------------------------------------------------------------- Linen transforms


def test_scan_remat_and_vmap():
    x = _normal(0, (3, 8, 4))

    def stack(bn_cls):
        class Body(nn.Module):
            @nn.compact
            def __call__(self, c, xs):
                return c, nn.remat(bn_cls)(use_running_average=False, momentum=0.5)(xs)

        return nn.scan(Body, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True},
                       in_axes=0, out_axes=0, length=3)()

    outs = []
    for cls, kw in [(nn.BatchNorm, dict(use_fast_variance=False)), (BN, {})]:
        import functools

        m = stack(functools.partial(cls, **kw))
        v = jax.jit(m.init)(jax.random.key(1), None, x)
        (_, y), upd = jax.jit(lambda v, x, m=m: m.apply(v, None, x, mutable=["batch_stats"]))(v, x)
        outs.append((y, upd))
    _close(outs[1], outs[0])

    # nn.vmap with axis_name: statistics over the whole vmapped batch
    vm = nn.vmap(BN, in_axes=0, out_axes=0, variable_axes={"params": None, "batch_stats": None},
                 split_rngs={"params": False}, axis_name="b")
    mod = vm(use_running_average=False, axis_name="b", momentum=0.0)
    v = jax.jit(mod.init)(jax.random.key(0), x)
    y, upd = jax.jit(lambda v, x: mod.apply(v, x, mutable=["batch_stats"]))(v, x)
    flat = x.reshape(-1, 4)
    _close(upd["batch_stats"]["mean"], flat.mean(0))
    _close(upd["batch_stats"]["var"], flat.var(0))
    _close(y, ((flat - flat.mean(0, keepdims=True)) / jnp.sqrt(flat.var(0, keepdims=True) + 1e-5)).reshape(x.shape))


def test_small_cnn_trains_like_flax():
    class CNN(nn.Module):
        norm: type

        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(4, (3, 3))(x)
            x = self.norm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
            x = x.mean((1, 2))
            x = nn.Dense(6)(x)
            x = self.norm(use_running_average=not train, momentum=0.9)(x)
            return nn.Dense(3)(nn.relu(x))

    xs = _normal(0, (4, 8, 6, 6, 2))
    ys = np.random.default_rng(1).integers(0, 3, (4, 8))
    tx = optax.sgd(0.1, momentum=0.9)
    results = []
    # flax's variables serve both models (same tree)
    v = jax.jit(CNN(nn.BatchNorm).init, static_argnames="train")(jax.random.key(1), xs[0], train=False)
    for norm in [nn.BatchNorm, BN]:
        model = CNN(norm if norm is BN else lambda **kw: nn.BatchNorm(use_fast_variance=False, **kw))
        params, stats = v["params"], v["batch_stats"]
        opt = tx.init(params)

        @jax.jit
        def step(params, stats, opt, x, y, model=model):
            def loss_fn(p):
                logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

            (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(g, opt)
            return optax.apply_updates(params, updates), stats, opt, loss

        losses = []
        for x, y in zip(xs, ys, strict=True):
            params, stats, opt, loss = step(params, stats, opt, x, y)
            losses.append(loss)
        results.append((np.array(losses), stats))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-4)
    _close(results[1][1], results[0][1], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- extras


def test_renorm_matches_reference():
    x = 1.0 + 2.0 * _normal(3, (10, 3))
    run_mean, run_var = jnp.array([0.5, -8.0, 0.0]), jnp.array([0.2, 1.0, 30.0])  # r and d clip on some features
    scale, bias = jnp.array([1.5, 0.5, 2.0]), jnp.array([0.1, 0.2, -0.3])
    v = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": run_mean, "var": run_var}}
    mod = BN(use_running_average=False, renorm=True, renorm_r_max=2.0, renorm_d_max=1.0, momentum=0.8)
    y, upd = mod.apply(v, x, mutable=["batch_stats"])
    y_ref, m, var, n = ref.renorm_train(x, run_mean, run_var, scale, bias, r_max=2.0, d_max=1.0)
    mean_ref, var_ref, _ = ref.update(run_mean, run_var, 0, m, var, n, momentum=0.8)
    _close(y, y_ref)
    _close(upd["batch_stats"], {"mean": mean_ref, "var": var_ref})
    _close(mod.clone(use_running_average=True).apply(v, x), ref.normalize(x, run_mean, run_var, scale, bias))


@pytest.mark.parametrize("shape, axis", [((12, 3), -1), ((6, 3, 2, 2), 1)], ids=["NC", "NCHW"])
def test_ghost_batch_matches_reference(shape, axis):
    x = 1.0 + _normal(4, shape) * np.arange(1, 13, dtype=np.float32).reshape((12,) + (1,) * (len(shape) - 1))[
        : shape[0]]
    mod = BN(use_running_average=False, virtual_batch_size=3 if shape[0] == 12 else 2, axis=axis, momentum=0.75)
    vbs = mod.virtual_batch_size
    v = mod.init(jax.random.key(0), x)
    y, upd = mod.apply(v, x, mutable=["batch_stats"])
    y_ref, means, variances, _ = ref.ghost_train(x, axis=axis, virtual_batch_size=vbs)
    _close(y, y_ref, rtol=1e-4, atol=1e-4)
    _close(upd["batch_stats"], {"mean": 0.25 * means.mean(0), "var": 0.75 + 0.25 * variances.mean(0)})
    # inference ignores virtual_batch_size: any batch size works
    y_inf = mod.clone(use_running_average=True).apply({**v, **upd}, x[:5])
    _close(y_inf, ref.normalize(x[:5], upd["batch_stats"]["mean"], upd["batch_stats"]["var"], axis=axis))
    # gradients flow through each group's own moments: autodiff of a per-group jnp version
    red = tuple(a for a in range(x.ndim) if a != axis % x.ndim)

    def per_group(x):
        ys = []
        for g in range(0, x.shape[0], vbs):
            xg = x[g:g + vbs]
            mu = xg.mean(red, keepdims=True)
            ys.append((xg - mu) / jnp.sqrt(((xg - mu) ** 2).mean(red, keepdims=True) + 1e-5))
        return jnp.concatenate(ys)

    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
    g = jax.jit(jax.grad(lambda x: jnp.sum(mod.apply(v, x, mutable=["batch_stats"])[0] * w)))(x)
    _close(g, jax.jit(jax.grad(lambda x: jnp.sum(per_group(x) * w)))(x), rtol=1e-4, atol=1e-4)


def test_ghost_batch_errors_and_init_fallback():
    mod = BN(use_running_average=False, virtual_batch_size=4)
    x = _normal(0, (6, 3))
    v = mod.init(jax.random.key(0), x)  # init falls back to whole-batch moments
    y, _ = mod.init_with_output(jax.random.key(0), x)
    _close(y, ref.normalize(x, *ref.moments(x)[:2]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide the batch size.*6 entries"):
        mod.apply(v, x, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="axis 0 is a feature axis"):
        BN(use_running_average=False, virtual_batch_size=2, axis=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="virtual_batch_size must be None or an int >= 1"):
        BN(use_running_average=False, virtual_batch_size=0).init(jax.random.key(0), x)
    # groups of one value per feature do not raise either (as flax with a batch of one)
    y1, _ = BN(use_running_average=False, virtual_batch_size=1).apply(v, x, mutable=["batch_stats"])
    _close(y1, jnp.zeros_like(x))


def test_unbiased_and_cumulative_momentum():
    xs = [_normal(i, (5, 2)) * (i + 1) for i in range(3)]
    mod = BN(use_running_average=False, momentum=None, unbiased=True)
    v = mod.init(jax.random.key(0), xs[0])
    assert set(v["batch_stats"]) == {"mean", "var", "count"}
    assert v["batch_stats"]["count"].dtype == jnp.int32 and int(v["batch_stats"]["count"]) == 0
    stats = v["batch_stats"]
    for x in xs:
        _, upd = mod.apply({"params": v["params"], "batch_stats": stats}, x, mutable=["batch_stats"])
        stats = upd["batch_stats"]
    assert int(stats["count"]) == 3
    _close(stats["mean"], np.mean([np.mean(np.asarray(x), 0) for x in xs], 0))
    _close(stats["var"], np.mean([np.var(np.asarray(x), 0, ddof=1) for x in xs], 0))
    # default tree has no count
    assert set(BN(use_running_average=False).init(jax.random.key(0), xs[0])["batch_stats"]) == {"mean", "var"}
    with pytest.raises(ValueError, match="momentum=1.5 is outside"):
        BN(use_running_average=False, momentum=1.5).init(jax.random.key(0), xs[0])


@pytest.mark.parametrize("mask_shape", [(8, 3), (8, 1), (1, 3)])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ghost_batch_with_mask(mask_shape, seed):
    """Any mask, fully masked ghost batches included: outputs and running stats against float64."""
    x = _normal(0, (8, 3)) * 2 + 1
    mask = _bernoulli(seed, 0.5, mask_shape)
    mod = BN(use_running_average=False, virtual_batch_size=4, momentum=0.0)
    v = mod.init(jax.random.key(0), x)
    y, upd = jax.jit(lambda v, x: mod.apply(v, x, mask=mask, mutable=["batch_stats"]))(v, x)
    full = np.broadcast_to(mask, x.shape)
    parts = [ref.moments(np.asarray(x)[g:g + 4], -1, full[g:g + 4]) for g in (0, 4)]
    y_ref = np.concatenate([ref.normalize(np.asarray(x)[g:g + 4], m, s) for g, (m, s, _) in zip((0, 4), parts,
                                                                                                 strict=True)])
    valid = full.astype(bool)
    if mask_shape[0] == 1:  # every entry of a masked-out feature is left out: only check valid entries
        np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], rtol=1e-4, atol=1e-4)
    else:
        groups_ok = np.stack([p[2] > 0 for p in parts]).repeat(4, 0)
        np.testing.assert_allclose(np.asarray(y)[groups_ok], y_ref[groups_ok], rtol=1e-4, atol=1e-4)
    mean, var, _ = ref.ghost_stats(x, 4, mask, momentum=0.0)
    _close(upd["batch_stats"], {"mean": mean, "var": var})


@pytest.mark.parametrize("momentum", [0.5, None])
def test_ghost_batches_padded_tail_equals_batch_without_it(momentum):
    """12 rows, groups of 4, the last 4 masked (padding): the update of the 8 real rows (was 33% off)."""
    x = _normal(5, (12, 3)) * 10 + 50
    mask = np.arange(12)[:, None] < 8
    mod = BN(use_running_average=False, virtual_batch_size=4, momentum=momentum, unbiased=False)
    v = mod.init(jax.random.key(0), x)
    _, padded = mod.apply(v, x, mask=mask, mutable=["batch_stats"])
    mean, var, count = ref.ghost_stats(x[:8], 4, momentum=momentum)
    np.testing.assert_allclose(padded["batch_stats"]["mean"], mean, **F32)
    np.testing.assert_allclose(padded["batch_stats"]["var"], var, **F32)
    if momentum is None:
        assert int(padded["batch_stats"]["count"]) == count == 1
    # a non-finite ghost batch contributes nothing either
    dirty = x.copy()
    dirty[9, 1] = np.inf
    _, upd = mod.apply(v, dirty, mutable=["batch_stats"])
    mean, var, _ = ref.ghost_stats(dirty, 4, momentum=momentum)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean, **F32)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var, **F32)


@settings(max_examples=15, deadline=None)
@given(
    size=st.sampled_from([3, 4]),
    padded=st.lists(st.booleans(), min_size=4, max_size=4),
    p_valid=st.sampled_from([0.3, 0.7, 1.0]),
    momentum=st.sampled_from([0.5, 0.9, None]),
    seed=st.integers(0, 2**31 - 1),
)
def test_ghost_batches_with_padded_groups_match_definition(size, padded, p_valid, momentum, seed):
    """12 rows in ghost batches of 3 or 4, whole groups padded (masked) at random, the rest partly masked:
    the running stats are the update with the mean of the contributing groups' moments (float64)."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(12, 3)) * rng.uniform(0.1, 10) + rng.normal() * 5).astype(np.float32)
    mask = rng.random((12, 3)) < p_valid
    for g, pad in enumerate(padded[: 12 // size]):
        if pad:
            mask[g * size:(g + 1) * size] = False
    old_mean, old_var = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    mod = BN(use_running_average=False, virtual_batch_size=size, momentum=momentum)
    v = mod.init(jax.random.key(0), x)
    count = np.array(2, np.int32)
    stats = {"mean": jnp.asarray(old_mean, jnp.float32), "var": jnp.asarray(old_var, jnp.float32)}
    if momentum is None:
        stats["count"] = jnp.asarray(count)
    _, upd = mod.apply({**v, "batch_stats": stats}, x, mask=mask, mutable=["batch_stats"])
    want_mean, want_var, want_count = ref.ghost_stats(x, size, mask, np.asarray(stats["mean"], np.float64),
                                                      np.asarray(stats["var"], np.float64), 2, momentum)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], want_mean, rtol=2e-5, atol=2e-5 * np.abs(x).max())
    np.testing.assert_allclose(upd["batch_stats"]["var"], want_var, rtol=2e-5, atol=1e-6)
    if momentum is None:
        assert int(upd["batch_stats"]["count"]) == want_count


# ---------------------------------------------------------------- bad batches (docs/contract.md)
# References from the definition, float64: a feature whose batch has inf/NaN keeps its running stats, the others
# take the EMA of their batch moments; masked-out NaN changes nothing; momentum=None across an all-masked batch is
# the plain average of the batches that contributed.


def _train(x, momentum=0.9, mask=None, variables=None):
    bn = BN(use_running_average=False, momentum=momentum)
    v = variables if variables is not None else bn.init(jax.random.key(0), x)
    y, upd = bn.apply(v, x, mask=mask, mutable=["batch_stats"])
    return y, {**v, **upd}


def _stats(v):
    return {k: np.asarray(a) for k, a in v["batch_stats"].items()}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_keep_their_running_stats(bad):
    x = _normal(11, (16, 3)) * 2.0 + 1.0
    _, v = _train(x)  # running stats away from their initial values
    before = _stats(v)
    x2 = _normal(12, (16, 3)) + 3.0
    x2[5, 1] = bad
    _, v2 = _train(x2, variables=v)
    after = _stats(v2)
    # the shared float64 reference: feature 1 (non-finite batch moments) keeps its values, 0 and 2 update
    mean, var, n = ref.moments(x2, -1)
    want_mean, want_var, _ = ref.update(before["mean"], before["var"], 0, mean, var, n, momentum=0.9)
    np.testing.assert_allclose(after["mean"], want_mean, **F32)
    np.testing.assert_allclose(after["var"], want_var, **F32)
    np.testing.assert_array_equal(after["mean"][1], before["mean"][1])
    np.testing.assert_array_equal(after["var"][1], before["var"][1])


def test_an_entirely_non_finite_batch_is_a_no_op_count_included():
    x = _normal(13, (8, 3))
    _, v = _train(x, momentum=None)
    before = _stats(v)
    _, v2 = _train(np.full((8, 3), np.nan, np.float32), momentum=None, variables=v)
    jax.tree.map(np.testing.assert_array_equal, _stats(v2), before)
    assert int(before["count"]) == 1


def test_nan_in_masked_entries_changes_nothing():
    x = _normal(14, (12, 3)) + 2.0
    mask = np.ones((12, 1), bool)
    mask[[2, 7]] = False
    dirty = x.copy()
    dirty[[2, 7]] = np.nan
    y_dirty, v_dirty = _train(dirty, mask=mask)
    y_clean, v_clean = _train(x, mask=mask)
    jax.tree.map(np.testing.assert_array_equal, _stats(v_dirty), _stats(v_clean))
    np.testing.assert_array_equal(np.asarray(y_dirty)[mask[:, 0]], np.asarray(y_clean)[mask[:, 0]])
    kept = x.astype(np.float64)[mask[:, 0]]
    np.testing.assert_allclose(_stats(v_clean)["mean"], 0.1 * kept.mean(0), **F32)


def test_cumulative_average_skips_an_all_masked_batch():
    batches = [_normal(s, (8, 2)) * (1 + s) + s for s in (15, 16, 17)]
    masks = [None, np.zeros((8, 1), bool), None]
    v = None
    for x, m in zip(batches, masks, strict=True):
        _, v = _train(x, momentum=None, mask=m, variables=v)
    got = _stats(v)
    contributing = [batches[0].astype(np.float64), batches[2].astype(np.float64)]
    np.testing.assert_allclose(got["mean"], np.mean([b.mean(0) for b in contributing], 0), **F32)
    np.testing.assert_allclose(got["var"], np.mean([b.var(0) for b in contributing], 0), **F32)
    assert int(got["count"]) == 2
