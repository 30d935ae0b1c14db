"""recompute_batch_stats (precise BN) for Linen, NNX, Equinox and Haiku, against a layer-by-layer hand computation."""

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

SIZES = (5, 8, 3)  # unequal batches: the statistics are count-weighted


def _batches():
    rng = np.random.default_rng(0)  # numpy: jax.random compiles a kernel for every new shape
    return [(2.0 + 3.0 * rng.normal(size=(n, 2))).astype(np.float32) for n in SIZES]


def _bn_train(h, scale, bias, eps=1e-5):
    mean, var = h.mean(0), h.var(0)
    return (h - mean) / np.sqrt(var + eps) * scale + bias


def _hand(batches, k1, b1, s1, c1, k2, b2):
    """Each layer's input over every batch, the model in training mode (float64)."""
    h1s, h2s = [], []
    for x in batches:
        h1 = np.asarray(x, np.float64) @ k1 + b1
        z = np.maximum(_bn_train(h1, s1, c1), 0.0)
        h1s.append(h1)
        h2s.append(z @ k2 + b2)
    return np.concatenate(h1s), np.concatenate(h2s)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4)(x)
        return nn.relu(jaxbn.linen.BatchNorm(use_running_average=not train)(x))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(3)(Block()(x, train))
        return jaxbn.linen.BatchNorm(use_running_average=not train, momentum=None, unbiased=True)(x)


def _random_params(params, key):
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(key)
    noisy = [p + 0.5 * rng.normal(size=p.shape).astype(np.float32) for p in leaves]
    return jax.tree.unflatten(tree, noisy)


def test_linen_matches_hand_computation():
    batches = _batches()
    model = Net()
    v = model.init(jax.random.key(1), batches[0], train=False)
    v = {"params": _random_params(v["params"], 2), "batch_stats": v["batch_stats"]}
    before = jax.tree.map(np.array, v)
    out = jaxbn.linen.recompute_batch_stats(model, v, batches, train=True)
    jax.tree.map(np.testing.assert_array_equal, v, before)  # inputs untouched
    assert out["params"] is v["params"]
    assert jax.tree.structure(out) == jax.tree.structure(v)
    assert jax.tree.map(lambda a: a.dtype, out) == jax.tree.map(lambda a: a.dtype, v)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    blk = p["Block_0"]
    h1, h2 = _hand(batches, blk["Dense_0"]["kernel"], blk["Dense_0"]["bias"], blk["BatchNorm_0"]["scale"],
                   blk["BatchNorm_0"]["bias"], p["Dense_0"]["kernel"], p["Dense_0"]["bias"])
    bs = out["batch_stats"]
    np.testing.assert_allclose(bs["Block_0"]["BatchNorm_0"]["mean"], h1.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bs["Block_0"]["BatchNorm_0"]["var"], h1.var(0), rtol=1e-5)
    np.testing.assert_allclose(bs["BatchNorm_0"]["mean"], h2.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bs["BatchNorm_0"]["var"], h2.var(0, ddof=1), rtol=1e-5)  # unbiased layer
    assert int(bs["BatchNorm_0"]["count"]) == len(SIZES)
    # not the average of per-batch variances (torch's update_bn): the spread of the batch means counts
    per_batch = np.mean([h1[a:a + n].var(0) for a, n in zip(np.cumsum((0,) + SIZES), SIZES, strict=False)], 0)
    assert not np.allclose(bs["Block_0"]["BatchNorm_0"]["var"], per_batch, rtol=1e-3)


def test_linen_forces_batch_moments_and_spreads_tuples():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, a, b):
            return jaxbn.linen.BatchNorm(use_running_average=True)(a + b)  # inference mode: still recomputed

    a, b = _batches()[:2]
    b = b[:5]
    v = Two().init(jax.random.key(0), a, b)
    out = jaxbn.linen.recompute_batch_stats(Two(), v, [(a, b), (b, a)])
    both = np.concatenate([a + b, b + a])
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], both.mean(0), rtol=1e-5)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], both.var(0), rtol=1e-5)


def test_linen_errors():
    x = _batches()[0]
    v = Net().init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="batches is empty"):
        jaxbn.linen.recompute_batch_stats(Net(), v, [], train=True)
    dense = nn.Dense(2)
    with pytest.raises(ValueError, match="no jaxbn.linen.BatchNorm layer reported its moments in Dense"):
        jaxbn.linen.recompute_batch_stats(dense, dense.init(jax.random.key(0), x), [x])


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.lin1 = nnx.Linear(2, 4, rngs=rngs)
        self.bn1 = jaxbn.nnx.BatchNorm(4, rngs=rngs)
        self.lin2 = nnx.Linear(4, 3, rngs=rngs)
        self.bn2 = jaxbn.nnx.BatchNorm(3, momentum=None, unbiased=True, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.lin2(nnx.relu(self.bn1(self.lin1(x)))))


def test_nnx_matches_hand_computation_and_linen():
    batches = _batches()
    model = NNXNet(nnx.Rngs(0))
    rng = np.random.default_rng(2)
    for var in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda a: isinstance(a, nnx.Variable)):
        var[...] = var[...] + 0.5 * rng.normal(size=var.shape).astype(np.float32)
    model.eval()
    params = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    jaxbn.nnx.recompute_batch_stats(model, batches)
    assert model.bn1.use_running_average is True  # modes kept
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params)

    def f(v):
        return np.asarray(v[...], np.float64)

    h1, h2 = _hand(batches, f(model.lin1.kernel), f(model.lin1.bias), f(model.bn1.scale), f(model.bn1.bias),
                   f(model.lin2.kernel), f(model.lin2.bias))
    np.testing.assert_allclose(model.bn1.mean[...], h1.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.bn1.var[...], h1.var(0), rtol=1e-5)
    np.testing.assert_allclose(model.bn2.mean[...], h2.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.bn2.var[...], h2.var(0, ddof=1), rtol=1e-5)
    assert int(model.bn2.count[...]) == len(SIZES)

    # the same numbers from the Linen version with the same parameters
    p = {"Block_0": {"Dense_0": {"kernel": model.lin1.kernel[...], "bias": model.lin1.bias[...]},
                     "BatchNorm_0": {"scale": model.bn1.scale[...], "bias": model.bn1.bias[...]}},
         "Dense_0": {"kernel": model.lin2.kernel[...], "bias": model.lin2.bias[...]},
         "BatchNorm_0": {"scale": model.bn2.scale[...], "bias": model.bn2.bias[...]}}
    v = Net().init(jax.random.key(0), batches[0], train=False)
    out = jaxbn.linen.recompute_batch_stats(Net(), {"params": p, "batch_stats": v["batch_stats"]}, batches,
                                            train=True)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], model.bn2.var[...], rtol=1e-6)


def test_nnx_errors():
    with pytest.raises(ValueError, match="has no jaxbn.nnx.BatchNorm layer"):
        jaxbn.nnx.recompute_batch_stats(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), _batches())
    with pytest.raises(ValueError, match="batches is empty"):
        jaxbn.nnx.recompute_batch_stats(NNXNet(nnx.Rngs(0)), [])

    class Skips(nnx.Module):
        def __init__(self, rngs):
            self.used = jaxbn.nnx.BatchNorm(2, rngs=rngs)
            self.unused = jaxbn.nnx.BatchNorm(2, rngs=rngs)

        def __call__(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="were never called"):
        jaxbn.nnx.recompute_batch_stats(Skips(nnx.Rngs(0)), _batches())


def _scanned(variable_axes):
    class Body(nn.Module):
        @nn.compact
        def __call__(self, c, x):
            return c, jaxbn.linen.BatchNorm(use_running_average=True)(2.0 * x)

    return nn.scan(Body, variable_axes=variable_axes, split_rngs={"params": True}, in_axes=0, out_axes=0, length=3)()


def test_linen_inside_scan():
    rng = np.random.default_rng(3)
    xs = [(rng.normal(size=(3, n, 2)) + i).astype(np.float32) for i, n in enumerate((4, 6))]
    model = _scanned({True: 0})
    v = model.init(jax.random.key(0), None, xs[0])
    out = jaxbn.linen.recompute_batch_stats(model, v, [(None, x) for x in xs])
    stats = out["batch_stats"]["BatchNorm_0"]
    every = 2.0 * np.concatenate([np.asarray(x) for x in xs], axis=1)  # (layer, entries, features)
    np.testing.assert_allclose(stats["mean"], every.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], every.var(1), rtol=1e-5)
    bad = _scanned({"params": 0, "batch_stats": 0})
    with pytest.raises(ValueError, match="must list the collection .jaxbn_precise_bn. in variable_axes"):
        jaxbn.linen.recompute_batch_stats(bad, bad.init(jax.random.key(0), None, xs[0]), [(None, xs[0])])


def test_layers_without_a_mode_are_recomputed():
    x = np.asarray(_batches()[1])
    v = jaxbn.linen.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    out = jaxbn.linen.recompute_batch_stats(jaxbn.linen.BatchNorm(), v, [x])  # no use_running_average anywhere
    np.testing.assert_allclose(out["batch_stats"]["var"], x.var(0), rtol=1e-5)
    layer = jaxbn.nnx.BatchNorm(2, use_running_average=None, rngs=nnx.Rngs(0))
    jaxbn.nnx.recompute_batch_stats(layer, [x])
    np.testing.assert_allclose(layer.var[...], x.var(0), rtol=1e-5)
    assert layer.use_running_average is None


# Recompute mode is part of what the model's transforms trace (Linen: the mutable collections; NNX: a
# static attribute of the layers), so a jit inside the model can never replay a trace of the other mode.


def _ema(old, x, momentum=0.99):
    x = np.asarray(x, np.float64)
    return momentum * old[0] + (1 - momentum) * x.mean(0), momentum * old[1] + (1 - momentum) * x.var(0)


class _LinenJitted(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        inner = nn.jit(jaxbn.linen.BatchNorm)(use_running_average=not train, use_scale=False, use_bias=False)
        return inner(x)


def test_linen_nn_jit_inside_the_model_traces_each_mode():
    batches = _batches()
    model = _LinenJitted()
    v = model.init(jax.random.key(0), batches[0], train=True)
    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])

    def stats(v):
        return tuple(np.asarray(v["batch_stats"]["JitBatchNorm_0"][k], np.float64) for k in ("mean", "var"))

    v = {**v, **step(v, batches[0])}  # a training trace exists before recompute
    np.testing.assert_allclose(stats(v), _ema((np.zeros(2), np.ones(2)), batches[0]), rtol=1e-5, atol=1e-6)
    v = jaxbn.linen.recompute_batch_stats(model, v, batches, train=True)
    every = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(stats(v), (every.mean(0), every.var(0)), rtol=1e-5, atol=1e-6)
    after = {**v, **step(v, batches[1])}  # the same jitted step trains again
    np.testing.assert_allclose(stats(after), _ema(stats(v), batches[1]), rtol=1e-5, atol=1e-6)


def test_linen_mutable_true_is_not_recompute_mode():
    x = _batches()[0]
    bn = jaxbn.linen.BatchNorm(use_running_average=False, use_scale=False, use_bias=False)
    v = bn.init(jax.random.key(0), x)
    _, state = bn.apply(v, x, mutable=True)
    assert "jaxbn_precise_bn" not in state
    np.testing.assert_allclose(state["batch_stats"]["mean"], _ema((np.zeros(2), np.ones(2)), x)[0], rtol=1e-5)


@nnx.jit
def _jitted_call(layer, x):
    return layer(x)


class _NNXJitted(nnx.Module):
    def __init__(self, rngs):
        self.bn = jaxbn.nnx.BatchNorm(2, use_scale=False, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return _jitted_call(self.bn, x)


def test_nnx_jit_inside_the_model_traces_each_mode():
    batches = _batches()
    model = _NNXJitted(nnx.Rngs(0))

    def stats():
        return tuple(np.asarray(v[...], np.float64) for v in (model.bn.mean, model.bn.var))

    model(batches[0])  # a training trace of _jitted_call exists before recompute
    np.testing.assert_allclose(stats(), _ema((np.zeros(2), np.ones(2)), batches[0]), rtol=1e-5, atol=1e-6)
    jaxbn.nnx.recompute_batch_stats(model, batches)
    every = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(stats(), (every.mean(0), every.var(0)), rtol=1e-5, atol=1e-6)
    assert model.bn.collect_moments is False
    before = stats()
    model(batches[1])  # the same nnx.jit function trains again
    np.testing.assert_allclose(stats(), _ema(before, batches[1]), rtol=1e-5, atol=1e-6)


# Bad batches (docs/contract.md, update_stats): masked entries, even NaN ones, and an all-masked batch
# contribute nothing.


def _masked_batches():
    rng = np.random.default_rng(5)
    xs = [(1.0 + 2.0 * rng.normal(size=(n, 2))).astype(np.float32) for n in (6, 4, 7)]
    masks = [np.ones((6, 1), bool), np.zeros((4, 1), bool), np.array([[1], [0], [1], [1], [0], [1], [1]], bool)]
    xs[1][:] = np.nan  # all masked
    xs[2][~masks[2][:, 0]] = np.nan  # NaN only where masked
    kept = np.concatenate([xs[0], xs[2][masks[2][:, 0]]]).astype(np.float64)
    return list(zip(xs, masks, strict=True)), kept


class _LinenMasked(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return jaxbn.linen.BatchNorm(use_running_average=True)(x, mask=mask)


class _NNXMasked(nnx.Module):
    def __init__(self, rngs):
        self.bn = jaxbn.nnx.BatchNorm(2, use_running_average=True, rngs=rngs)

    def __call__(self, x, mask):
        return self.bn(x, mask=mask)


def test_masked_nan_and_all_masked_batches_contribute_nothing():
    batches, kept = _masked_batches()
    v = _LinenMasked().init(jax.random.key(0), *batches[0])
    out = jaxbn.linen.recompute_batch_stats(_LinenMasked(), v, batches)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], kept.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], kept.var(0), rtol=1e-5)
    model = _NNXMasked(nnx.Rngs(0))
    jaxbn.nnx.recompute_batch_stats(model, batches)
    np.testing.assert_allclose(model.bn.mean[...], kept.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn.var[...], kept.var(0), rtol=1e-5)


def test_non_finite_batch_is_left_out_per_feature():
    """A batch with NaN in a VALID entry of feature 0 (and inf in all of another batch) poisons nothing:
    feature 0 is the population of the other batches, feature 1 of every finite batch."""
    rng = np.random.default_rng(7)
    xs = [(1.0 + 2.0 * rng.normal(size=(n, 2))).astype(np.float32) for n in (6, 5, 7, 3)]
    xs[1][2, 0] = np.nan
    xs[3][:] = np.inf
    every = np.ones((1, 1), bool)
    batches = [(x, every) for x in xs]
    want0 = np.concatenate([xs[0], xs[2]])[:, 0].astype(np.float64)
    want1 = np.concatenate(xs[:3])[:, 1].astype(np.float64)
    v = _LinenMasked().init(jax.random.key(0), *batches[0])
    stats = jaxbn.linen.recompute_batch_stats(_LinenMasked(), v, batches)["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], [want0.mean(), want1.mean()], rtol=1e-5)
    np.testing.assert_allclose(stats["var"], [want0.var(), want1.var()], rtol=1e-5)
    model = _NNXMasked(nnx.Rngs(0))
    jaxbn.nnx.recompute_batch_stats(model, batches)
    np.testing.assert_allclose(model.bn.mean[...], [want0.mean(), want1.mean()], rtol=1e-5)
    np.testing.assert_allclose(model.bn.var[...], [want0.var(), want1.var()], rtol=1e-5)


def test_linen_names_a_scanned_layer_that_cannot_report():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            _, y = _scanned({"params": 0, "batch_stats": 0})(None, x)  # no variable_axes for the moments
            return jaxbn.linen.BatchNorm(use_running_average=True)(y)

    x = np.asarray(_batches()[0])[None].repeat(3, 0)
    v = Mixed().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"cannot collect the moments of the BatchNorm layer 'ScanBody_0/"):
        jaxbn.linen.recompute_batch_stats(Mixed(), v, [x])


def test_large_offsets_over_many_batches_stay_accurate():
    """float32 input 1e4 + N(0, 1) over 100 batches: the variance within 1e-4 of the float64 value."""
    rng = np.random.default_rng(6)
    xs = [(1e4 + rng.normal(size=(16, 3))).astype(np.float32) for _ in range(100)]
    every = np.concatenate(xs).astype(np.float64)
    layer = jaxbn.nnx.BatchNorm(3, use_running_average=True, rngs=nnx.Rngs(0))
    jaxbn.nnx.recompute_batch_stats(layer, xs)
    np.testing.assert_allclose(layer.var[...], every.var(0), rtol=1e-4)
    np.testing.assert_allclose(layer.mean[...], every.mean(0), rtol=0, atol=2e-3)  # float32 spacing at 1e4: 1e-3


# Equinox and Haiku: the same semantics (two-layer hand computation, masks, non-finite batches).


class _EqxNet(eqx.Module):
    l1: eqx.nn.Linear
    bn1: jaxbn.equinox.BatchNorm
    l2: eqx.nn.Linear
    bn2: jaxbn.equinox.BatchNorm

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(2, 4, key=k1)
        self.bn1 = jaxbn.equinox.BatchNorm(4, "batch", mode="batch")
        self.l2 = eqx.nn.Linear(4, 3, key=k2)
        self.bn2 = jaxbn.equinox.BatchNorm(3, "batch", mode="ema", inference=True)  # still recomputed

    def __call__(self, x, state):
        h, state = self.bn1(self.l1(x), state)
        return self.bn2(self.l2(jax.nn.relu(h)), state)


def test_equinox_matches_hand_computation():
    batches = _batches()
    model, state = eqx.nn.make_with_state(_EqxNet)(jax.random.key(1))
    before = jax.tree.map(np.array, state)
    out = jaxbn.equinox.recompute_batch_stats(model, state, batches)  # default forward: vmap over "batch"
    jax.tree.map(np.testing.assert_array_equal, state, before)  # the state passed in stays valid, unchanged
    assert jax.tree.structure(out) == jax.tree.structure(state)
    h1, h2 = _hand(batches, *(np.asarray(a, np.float64) for a in (
        model.l1.weight.T, model.l1.bias, model.bn1.weight, model.bn1.bias, model.l2.weight.T, model.l2.bias)))
    mean1, var1 = out.get(model.bn1.batch_state_index)
    np.testing.assert_allclose(mean1, h1.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var1, h1.var(0), rtol=1e-5)
    assert int(out.get(model.bn1.batch_counter)) == len(SIZES)
    mean2, var2 = out.get(model.bn2.ema_state_index)
    np.testing.assert_allclose(mean2, h2.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var2, h2.var(0), rtol=1e-5)
    assert not bool(out.get(model.bn2.ema_first_time_index))


def _hk_net(x, is_training):
    x = hk.Linear(4)(x)
    x = jax.nn.relu(jaxbn.haiku.BatchNorm(True, True, 0.9)(x, is_training))
    return jaxbn.haiku.BatchNorm(True, True, 0.99)(hk.Linear(3)(x), is_training)


def test_haiku_matches_hand_computation():
    batches = _batches()
    f = hk.transform_with_state(_hk_net)
    params, state = f.init(jax.random.key(1), batches[0], True)
    params = _random_params(params, 3)
    before = jax.tree.map(np.array, state)
    out = jaxbn.haiku.recompute_batch_stats(f, params, state, batches, is_training=False)  # still recomputed
    jax.tree.map(np.testing.assert_array_equal, state, before)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h1, h2 = _hand(batches, p["linear"]["w"], p["linear"]["b"], p["batch_norm"]["scale"][0],
                   p["batch_norm"]["offset"][0], p["linear_1"]["w"], p["linear_1"]["b"])
    for name, h, decay in (("batch_norm", h1, 0.9), ("batch_norm_1", h2, 0.99)):
        for suffix, want in (("mean_ema", h.mean(0)), ("var_ema", h.var(0))):
            ema = out[f"{name}/~/{suffix}"]
            np.testing.assert_allclose(ema["average"][0], want, rtol=1e-5, atol=1e-5)
            assert int(ema["counter"]) == len(SIZES)
            np.testing.assert_allclose(ema["hidden"][0], want * (1 - decay ** len(SIZES)), rtol=1e-5, atol=1e-6)
    # inference then uses the recomputed averages
    y, _ = f.apply(params, out, None, batches[0], False)
    assert np.all(np.isfinite(y))


def _eqx_masked():
    return eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(2, "batch", mode="batch")


def _eqx_masked_forward(model, state, x, mask):
    mask = jnp.broadcast_to(jnp.asarray(mask), (x.shape[0], 1))
    call = jax.vmap(lambda x, m, s: model(x, s, mask=m), axis_name="batch", in_axes=(0, 0, None), out_axes=(0, None))
    return call(x, mask, state)


_hk_masked = hk.transform_with_state(lambda x, mask: jaxbn.haiku.BatchNorm(False, False, 0.9)(x, True, mask=mask))


def _eqx_hk_recomputed(batches):
    """(mean, var) of the one layer, recomputed by Equinox and by Haiku."""
    bn, state = _eqx_masked()
    out = jaxbn.equinox.recompute_batch_stats(bn, state, batches, forward=_eqx_masked_forward)
    params, hk_state = _hk_masked.init(None, *batches[0])
    hk_out = jaxbn.haiku.recompute_batch_stats(_hk_masked, params, hk_state, batches)
    eqx_stats = tuple(out.get(bn.batch_state_index))
    hk_stats = tuple(hk_out[f"batch_norm/~/{k}"]["average"][0] for k in ("mean_ema", "var_ema"))
    return eqx_stats, hk_stats


def test_equinox_haiku_masked_nan_and_all_masked_batches_contribute_nothing():
    batches, kept = _masked_batches()
    for mean, var in _eqx_hk_recomputed(batches):
        np.testing.assert_allclose(mean, kept.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, kept.var(0), rtol=1e-5)


def test_equinox_haiku_non_finite_batch_is_left_out_per_feature():
    rng = np.random.default_rng(7)
    xs = [(1.0 + 2.0 * rng.normal(size=(n, 2))).astype(np.float32) for n in (6, 5, 7, 3)]
    xs[1][2, 0] = np.nan
    xs[3][:] = np.inf
    every = np.ones((1, 1), bool)
    want0 = np.concatenate([xs[0], xs[2]])[:, 0].astype(np.float64)
    want1 = np.concatenate(xs[:3])[:, 1].astype(np.float64)
    for mean, var in _eqx_hk_recomputed([(x, every) for x in xs]):
        np.testing.assert_allclose(mean, [want0.mean(), want1.mean()], rtol=1e-5)
        np.testing.assert_allclose(var, [want0.var(), want1.var()], rtol=1e-5)


def test_equinox_haiku_errors():
    bn, state = _eqx_masked()
    x = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="batches is empty"):
        jaxbn.equinox.recompute_batch_stats(bn, state, [])
    with pytest.raises(ValueError, match=r"1 jaxbn.equinox.BatchNorm layer\(s\) of BatchNorm were never called"):
        jaxbn.equinox.recompute_batch_stats(bn, state, [x], forward=lambda m, s, x: (x, s))
    with pytest.raises(ValueError, match="has no jaxbn.equinox.BatchNorm layer to recompute"):
        jaxbn.equinox.recompute_batch_stats(eqx.nn.Linear(2, 2, key=jax.random.key(0)), state, [x])
    two = (jaxbn.equinox.BatchNorm(2, "a", mode="batch"), jaxbn.equinox.BatchNorm(2, "b", mode="batch"))
    two_state = eqx.nn.State(two)
    with pytest.raises(ValueError, match=r"axis names \['a', 'b'\]: pass forward="):
        jaxbn.equinox.recompute_batch_stats(two, two_state, [x])
    params, hk_state = _hk_masked.init(None, x, None)
    with pytest.raises(ValueError, match="batches is empty"):
        jaxbn.haiku.recompute_batch_stats(_hk_masked, params, hk_state, [])
    with pytest.raises(ValueError, match="the state has no batch norm to recompute"):
        jaxbn.haiku.recompute_batch_stats(_hk_masked, params, {}, [x])
    skipping = hk.transform_with_state(
        lambda x, use: jaxbn.haiku.BatchNorm(False, False, 0.9)(x, True) if use else x)
    params, hk_state = skipping.init(None, x, True)
    with pytest.raises(ValueError, match=r"the batch norm\(s\) \['batch_norm'\] were never called"):
        jaxbn.haiku.recompute_batch_stats(skipping, params, hk_state, [x], use=False)


class _CumulativeBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(2)(jaxbn.linen.BatchNorm(use_running_average=False, momentum=None)(x)), None


def test_linen_stacked_cumulative_layers_keep_one_count_per_layer():
    """nn.scan-stacked momentum=None layers: each layer's population statistics, count one per layer (the
    number of batches), and the model trains on afterwards."""
    model = nn.scan(_CumulativeBlock, variable_axes={True: 0}, split_rngs={"params": True}, length=2)()
    batches = _batches()
    v = model.init(jax.random.key(0), batches[0], None)
    out = jaxbn.linen.recompute_batch_stats(model, v, [(x, None) for x in batches])
    k, b = (np.asarray(v["params"]["Dense_0"][n][0], np.float64) for n in ("kernel", "bias"))
    h0 = [np.asarray(x, np.float64) for x in batches]
    h1 = [(h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) @ k + b for h in h0]
    stats = out["batch_stats"]["BatchNorm_0"]
    for layer, h in enumerate((np.concatenate(h0), np.concatenate(h1))):
        np.testing.assert_allclose(stats["mean"][layer], h.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["var"][layer], h.var(0), rtol=1e-5)
    np.testing.assert_array_equal(stats["count"], [len(batches)] * 2)
    _, upd = model.apply(out, batches[0], None, mutable=["batch_stats"])
    np.testing.assert_array_equal(upd["batch_stats"]["BatchNorm_0"]["count"], [len(batches) + 1] * 2)


def _hk_ema_step(average, counter, value, decay):
    """One step of haiku's zero-debiased EMA from a state (average, counter), float64: hidden is
    average * (1 - decay ** counter); the new average is (decay * hidden + (1 - decay) * value) divided
    by (1 - decay ** (counter + 1))."""
    hidden = np.asarray(average, np.float64) * (1 - decay**counter)
    return (decay * hidden + (1 - decay) * value) / (1 - decay ** (counter + 1))


def test_haiku_unreached_features_train_on_from_their_kept_average():
    """Features no batch reached keep their average, and the next training step is haiku's EMA step from it (and
    from the new counter); a feature that never had a valid batch takes the next batch as it is."""
    f = hk.transform_with_state(lambda x, m: jaxbn.haiku.BatchNorm(False, False, 0.9)(x, True, mask=m))
    rng = np.random.default_rng(5)
    data = [(5.0 + rng.normal(size=(6, 3))).astype(np.float32) for _ in range(6)]
    never = np.array([[True, True, False]])  # the third feature is never valid before the last step
    params, state = f.init(None, data[0], never)
    for x in data[:3]:
        _, state = f.apply(params, state, None, x, never)
    reached = np.array([[True, False, False]])
    out = jaxbn.haiku.recompute_batch_stats(f, params, state, [(x, reached) for x in data[3:5]])
    _, after = f.apply(params, out, None, data[5], None)
    population = np.concatenate(data[3:5]).astype(np.float64)
    mean, var, _ = ref.moments(data[5])
    for suffix, recomputed, value in (("mean_ema", population.mean(0), mean), ("var_ema", population.var(0), var)):
        kept = np.asarray(state[f"batch_norm/~/{suffix}"]["average"][0], np.float64)
        start = np.array([recomputed[0], kept[1], kept[2]])
        want = _hk_ema_step(start, 2, value, 0.9)
        want[2] = value[2]
        got = after[f"batch_norm/~/{suffix}"]
        assert int(got["counter"]) == 3
        np.testing.assert_allclose(got["average"][0], want, rtol=1e-5, atol=1e-6)


def _hk_stacked(x, is_training):
    def block(x):
        return jaxbn.haiku.BatchNorm(True, True, 0.9)(hk.Linear(2)(x), is_training)

    return hk.layer_stack(2)(block)(x)


def test_haiku_layer_stack_recomputes_each_layer():
    batches = _batches()
    f = hk.transform_with_state(_hk_stacked)
    params, state = f.init(jax.random.key(0), batches[0], True)
    params = jax.tree.map(lambda a: a + 0.5 * ref.normal(int(a.size), a.shape), params)
    out = jaxbn.haiku.recompute_batch_stats(f, params, state, batches, is_training=False)
    p = {k.rsplit("/", 1)[-1]: jax.tree.map(lambda a: np.asarray(a, np.float64), v) for k, v in params.items()}
    w, b, scale, offset = p["linear"]["w"], p["linear"]["b"], p["batch_norm"]["scale"], p["batch_norm"]["offset"]
    name = next(k for k in state if k.endswith("/~/mean_ema"))[: -len("/~/mean_ema")]
    hs = [np.asarray(x, np.float64) for x in batches]
    for layer in range(2):
        zs = [h @ w[layer] + b[layer] for h in hs]
        for suffix, want in (("mean_ema", np.concatenate(zs).mean(0)), ("var_ema", np.concatenate(zs).var(0))):
            ema = out[f"{name}/~/{suffix}"]
            assert int(ema["counter"][layer]) == len(SIZES)
            np.testing.assert_allclose(ema["average"][layer, 0], want, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(ema["hidden"][layer, 0], want * (1 - 0.9 ** len(SIZES)), rtol=1e-5, atol=1e-5)
        hs = [ref.normalize(z, *ref.moments(z)[:2], scale[layer, 0], offset[layer, 0]) for z in zs]


def test_haiku_leaves_haikus_own_batch_norm_alone():
    """A model with haiku's own hk.BatchNorm too: jaxbn's layer is recomputed on its input (haiku's layer's
    training output), haiku's layer keeps its state."""
    def net(x, is_training):
        x = hk.BatchNorm(False, False, 0.9, name="theirs")(x, is_training)
        return jaxbn.haiku.BatchNorm(False, False, 0.9, name="ours")(2.0 * x + 1.0, is_training)

    batches = _batches()
    f = hk.transform_with_state(net)
    with jax.numpy_dtype_promotion("standard"):  # haiku's own layer mixes int32 and float32
        params, state = f.init(None, batches[0], True)
        out = jaxbn.haiku.recompute_batch_stats(f, params, state, batches, is_training=True)
    for suffix in ("mean_ema", "var_ema"):
        jax.tree.map(np.testing.assert_array_equal, out[f"theirs/~/{suffix}"], state[f"theirs/~/{suffix}"])
    h = np.concatenate([2.0 * ref.normalize(x, *ref.moments(x)[:2]) + 1.0 for x in batches])
    np.testing.assert_allclose(out["ours/~/mean_ema"]["average"][0], h.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["ours/~/var_ema"]["average"][0], h.var(0), rtol=1e-4, atol=1e-5)
