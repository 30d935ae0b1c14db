"""Freezing for fine-tuning (FrozenBatchNorm2d, praxis' force_eval_mode) in every framework.

The same two-layer model in each framework, `Dense(4 -> 3) -> BatchNorm -> relu -> Dense(3 -> 2)`,
with "pretrained" running statistics, frozen with the wrapper's `freeze` and trained for one step:
the output is the float64 inference-mode formula, the statistics do not change and get no
gradient, and the batch norm's affine parameters get a gradient or not, as chosen.
"""

import equinox as eqx
import flax
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

EPS = 1e-5
RNG = np.random.default_rng(0)
X = RNG.normal(size=(16, 4)).astype(np.float32)
MEAN = RNG.normal(size=3).astype(np.float32)  # "pretrained" running statistics, far from the batch's
VAR = RNG.uniform(0.5, 3.0, size=3).astype(np.float32)


def reference(w1, b1, scale, bias, w2, b2, mean=MEAN, var=VAR):
    """float64 inference-mode forward pass, from the definition."""
    f = lambda a: np.asarray(a, np.float64).reshape(-1)  # noqa: E731  (haiku keeps (1, C) parameters)
    h = X.astype(np.float64) @ np.asarray(w1, np.float64) + f(b1)
    h = (h - f(mean)) / np.sqrt(f(var) + EPS) * f(scale) + f(bias)
    return np.maximum(h, 0.0) @ np.asarray(w2, np.float64) + f(b2)


def loss_of(y):
    return jnp.sum(jnp.sin(y))  # a cotangent that is not constant per feature


def assert_nonzero(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.any(np.asarray(leaf) != 0)


# ---------------------------------------------------------------- Linen


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        h = nn.Dense(3)(x)
        h = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
        return nn.Dense(2)(nn.relu(h))


@pytest.mark.parametrize("affine", [True, False])
def test_linen_freeze(affine):
    model = LinenNet()
    variables = model.init(jax.random.key(0), X, train=False)
    variables = {"params": variables["params"], "batch_stats": {"bn": {"mean": MEAN, "var": VAR}}}
    apply = jaxbn.linen.freeze(model.apply, affine=affine)

    # train=True everywhere else; batch_stats mutable as in a usual training step: nothing is written.
    y, updates = apply(variables, X, train=True, mutable=["batch_stats"])
    p = variables["params"]
    ref = reference(p["Dense_0"]["kernel"], p["Dense_0"]["bias"], p["bn"]["scale"], p["bn"]["bias"],
                    p["Dense_1"]["kernel"], p["Dense_1"]["bias"])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])

    # Differentiate everything, statistics included (FrozenBatchNorm2d's buffers get no gradient).
    grads = jax.jit(jax.grad(lambda v: loss_of(apply(v, X, train=True, mutable=["batch_stats"])[0])))(variables)
    jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0.0), grads["batch_stats"])
    assert_nonzero(grads["params"]["Dense_0"])  # the layers before and after keep training
    assert_nonzero(grads["params"]["Dense_1"])
    if affine:
        assert_nonzero(grads["params"]["bn"])
    else:
        jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0.0), grads["params"]["bn"])


def test_linen_unfrozen_model_still_trains():
    """The check above can fail: without freeze the same call normalizes with the batch and updates."""
    model = LinenNet()
    variables = model.init(jax.random.key(0), X, train=False)
    variables = {"params": variables["params"], "batch_stats": {"bn": {"mean": MEAN, "var": VAR}}}
    _, updates = model.apply(variables, X, train=True, mutable=["batch_stats"])
    assert not np.allclose(updates["batch_stats"]["bn"]["mean"], MEAN)


# ---------------------------------------------------------------- NNX


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.dense0 = nnx.Linear(4, 3, rngs=rngs)
        self.bn = jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=rngs)
        self.dense1 = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.dense1(nnx.relu(self.bn(self.dense0(x))))


@pytest.mark.parametrize("affine", [True, False])
def test_nnx_freeze(affine):
    model = NNXNet(nnx.Rngs(0))
    model.bn.mean[...] = jnp.asarray(MEAN)
    model.bn.var[...] = jnp.asarray(VAR)
    frozen = jaxbn.nnx.freeze(model)
    params = nnx.Param if affine else nnx.All(nnx.Param, nnx.Not(nnx.PathContains("bn")))
    grads = nnx.grad(lambda m: loss_of(m(X)), argnums=nnx.DiffState(0, params))(frozen)
    flat = {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(grads)}
    assert not [k for k in flat if k.endswith(("mean", "var"))]  # statistics: no gradient at all
    assert_nonzero([v.get_value() for k, v in flat.items() if k.startswith(("dense0", "dense1"))])
    bn_grads = [v.get_value() for k, v in flat.items() if k.startswith("bn")]
    if affine:
        assert len(bn_grads) == 2
        assert_nonzero(bn_grads)
    else:
        assert bn_grads == []

    y = frozen(X)
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), MEAN)  # neither call updated them
    np.testing.assert_array_equal(np.asarray(model.bn.var[...]), VAR)
    ref = reference(model.dense0.kernel[...], model.dense0.bias[...], model.bn.scale[...], model.bn.bias[...],
                    model.dense1.kernel[...], model.dense1.bias[...])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    assert model.bn.use_running_average is False  # the model itself keeps training
    model(X)
    assert not np.allclose(np.asarray(model.bn.mean[...]), MEAN)


class NNXTrainingCall(nnx.Module):
    """A model that asks its batch norm for training at call time, as some user models do."""

    def __init__(self, rngs):
        self.bn = jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        return self.bn(x, use_running_average=False)


@pytest.mark.parametrize("undo", ["view.train()", "call-time use_running_average=False"])
def test_nnx_freeze_holds_whatever_the_mode_says(undo):
    """The frozen view normalizes with the stored statistics (float64 reference) and leaves them alone,
    after `.train()` on the view (the usual first line of an NNX loop) or under a call-time override."""
    model = NNXNet(nnx.Rngs(0)) if undo == "view.train()" else NNXTrainingCall(nnx.Rngs(0))
    model.bn.mean[...] = jnp.asarray(MEAN)
    model.bn.var[...] = jnp.asarray(VAR)
    frozen = jaxbn.nnx.freeze(model)
    if undo == "view.train()":
        frozen.train()
        x = np.asarray(model.dense0(jnp.asarray(X)))
    else:
        x = np.asarray(X[:, :3])
    y = frozen.bn(jnp.asarray(x)) if undo == "view.train()" else frozen(jnp.asarray(x))
    want = (x.astype(np.float64) - MEAN) / np.sqrt(np.asarray(VAR, np.float64) + 1e-5)
    want = want * np.asarray(model.bn.scale[...]) + np.asarray(model.bn.bias[...])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), MEAN)
    np.testing.assert_array_equal(np.asarray(model.bn.var[...]), VAR)


# ---------------------------------------------------------------- Equinox


class EqxNet(eqx.Module):
    dense0: eqx.nn.Linear
    bn: jaxbn.equinox.BatchNorm
    dense1: eqx.nn.Linear

    def __init__(self, key):
        k0, k1 = jax.random.split(key)
        self.dense0 = eqx.nn.Linear(4, 3, key=k0)
        self.bn = jaxbn.equinox.BatchNorm(3, "batch", momentum=0.9, mode="batch")
        self.dense1 = eqx.nn.Linear(3, 2, key=k1)

    def __call__(self, x, state):
        h, state = self.bn(self.dense0(x), state)
        return self.dense1(jax.nn.relu(h)), state


def _eqx_forward(model, state):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(jnp.asarray(X), state)


@pytest.mark.parametrize("affine", [True, False])
def test_equinox_freeze(affine):
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    state = state.set(model.bn.batch_state_index, (jnp.asarray(MEAN), jnp.asarray(VAR)))
    frozen = jaxbn.equinox.freeze(model)
    assert frozen.bn.inference and not model.bn.inference
    spec = jax.tree.map(eqx.is_inexact_array, frozen)
    if not affine:
        spec = eqx.tree_at(lambda m: (m.bn.weight, m.bn.bias), spec, (False, False))
    diff, static = eqx.partition(frozen, spec)

    def loss(d, s):
        y, s = _eqx_forward(eqx.combine(d, static), s)
        return loss_of(y), s

    (_, new_state), grads = eqx.filter_jit(jax.value_and_grad(loss, has_aux=True))(diff, state)
    for index in (model.bn.batch_state_index, model.bn.batch_counter):  # the state is returned unchanged
        jax.tree.map(np.testing.assert_array_equal, new_state.get(index), state.get(index))
    assert_nonzero([grads.dense0, grads.dense1])
    if affine:
        assert_nonzero([grads.bn.weight, grads.bn.bias])
    else:
        assert grads.bn.weight is None and grads.bn.bias is None

    y, _ = _eqx_forward(frozen, state)
    ref = reference(model.dense0.weight.T, model.dense0.bias, model.bn.weight, model.bn.bias,
                    model.dense1.weight.T, model.dense1.bias)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- Haiku


def _hk_net(x, is_training):
    h = hk.Linear(3, name="dense0")(x)
    h = jaxbn.haiku.BatchNorm(True, True, 0.9, name="bn")(h, is_training)
    return hk.Linear(2, name="dense1")(jax.nn.relu(h))


@pytest.mark.parametrize("affine", [True, False])
def test_haiku_freeze(affine):
    f = hk.transform_with_state(jaxbn.haiku.freeze(_hk_net, affine=affine))
    params, state = hk.transform_with_state(_hk_net).init(jax.random.key(0), X, True)
    state = {**state, "bn/~/mean_ema": {**state["bn/~/mean_ema"], "average": MEAN[None]},
             "bn/~/var_ema": {**state["bn/~/var_ema"], "average": VAR[None]}}

    def loss(p, s):
        y, s = f.apply(p, s, None, X, True)
        return loss_of(y), s

    (_, new_state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, state)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)  # counters, hidden and averages unchanged
    assert_nonzero([grads["dense0"], grads["dense1"]])
    if affine:
        assert_nonzero(grads["bn"])
    else:
        jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0.0), grads["bn"])

    y, _ = f.apply(params, state, None, X, True)
    ref = reference(params["dense0"]["w"], params["dense0"]["b"], params["bn"]["scale"], params["bn"]["offset"],
                    params["dense1"]["w"], params["dense1"]["b"])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    # Unfrozen, the same call updates the averages.
    _, trained = hk.transform_with_state(_hk_net).apply(params, state, None, X, True)
    assert not np.allclose(trained["bn/~/mean_ema"]["average"], MEAN[None])


def _linen_setup():
    model = LinenNet()
    variables = model.init(jax.random.key(0), X, train=False)
    variables = {"params": variables["params"], "batch_stats": {"bn": {"mean": MEAN, "var": VAR}}}
    p = variables["params"]
    ref = reference(p["Dense_0"]["kernel"], p["Dense_0"]["bias"], p["bn"]["scale"], p["bn"]["bias"],
                    p["Dense_1"]["kernel"], p["Dense_1"]["bias"])
    return model, variables, ref


def _assert_frozen(out, variables, ref):
    y, updates = out
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


def _assert_trained(out):
    _, updates = out
    assert not np.allclose(updates["batch_stats"]["bn"]["mean"], MEAN)


def test_linen_freeze_and_jit_cache():
    """A function jitted outside `freeze` runs frozen inside it (and one traced under `freeze` runs
    unfrozen outside it), whichever ran first: jit's cache tells them apart."""
    model, variables, ref = _linen_setup()

    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    _assert_trained(step(variables, X))                                    # traced unfrozen first
    _assert_frozen(jaxbn.linen.freeze(step)(variables, X), variables, ref)  # then frozen: not from the cache
    _assert_trained(step(variables, X))

    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    frozen_step = jax.jit(jaxbn.linen.freeze(lambda v, x: step(v, x)))    # traced frozen first, inside a jit
    _assert_frozen(frozen_step(variables, X), variables, ref)
    _assert_trained(step(variables, X))
    _assert_frozen(frozen_step(variables, X), variables, ref)

    # Traced frozen (nothing written), then called unfrozen without a mutable batch_stats: flax's error.
    forward = jax.jit(lambda v, x: model.apply(v, x, train=True))
    np.testing.assert_allclose(np.asarray(jaxbn.linen.freeze(forward)(variables, X)), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        forward(variables, X)

    # freeze around an already jitted apply.
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    frozen = jaxbn.linen.freeze(apply, affine=False)
    _assert_frozen(frozen(variables, X, train=True, mutable=("batch_stats",)), variables, ref)
    _assert_trained(apply(variables, X, train=True, mutable=("batch_stats",)))


def test_equinox_freeze_holds_under_call_time_inference():
    """A frozen layer called with `inference=False` (or after `eqx.nn.inference_mode(model, False)`)
    in a jitted training step normalizes with the stored statistics and returns the state unchanged."""

    class TrainingCall(eqx.Module):
        bn: jaxbn.equinox.BatchNorm

        def __call__(self, x, state):
            return self.bn(x, state, inference=False)

    model, state = eqx.nn.make_with_state(TrainingCall)(jaxbn.equinox.BatchNorm(3, "batch", momentum=0.9,
                                                                                 mode="batch"))
    state = state.set(model.bn.batch_state_index, (jnp.asarray(MEAN), jnp.asarray(VAR)))
    x = np.asarray(X[:, :3])
    want = (x.astype(np.float64) - MEAN) / np.sqrt(np.asarray(VAR, np.float64) + EPS)
    want = want * np.asarray(model.bn.weight, np.float64) + np.asarray(model.bn.bias, np.float64)

    @eqx.filter_jit
    def step(m, s):
        def loss(m):
            y, s2 = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(jnp.asarray(x), s)
            return loss_of(y), (y, s2)
        (_, aux), grads = eqx.filter_value_and_grad(loss, has_aux=True)(m)
        return aux, grads

    for frozen in (jaxbn.equinox.freeze(model), eqx.nn.inference_mode(jaxbn.equinox.freeze(model), False)):
        (y, new_state), grads = step(frozen, state)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
        for index in (model.bn.batch_state_index, model.bn.batch_counter):
            jax.tree.map(np.testing.assert_array_equal, new_state.get(index), state.get(index))
        assert_nonzero([grads.bn.weight, grads.bn.bias])
    (_, new_state), _ = step(model, state)  # unfrozen, the same step trains
    assert new_state.get(model.bn.batch_counter) == 1


def test_equinox_frozen_model_serialises_as_the_model(tmp_path):
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    frozen = jaxbn.equinox.freeze(model)
    eqx.tree_serialise_leaves(tmp_path / "frozen.eqx", frozen)
    loaded = eqx.tree_deserialise_leaves(tmp_path / "frozen.eqx", model)
    assert jax.tree.structure(loaded) == jax.tree.structure(model)  # (the saved `inference` flag loads too)
    jax.tree.map(np.testing.assert_array_equal, eqx.filter(loaded, eqx.is_array), eqx.filter(model, eqx.is_array))
    eqx.tree_serialise_leaves(tmp_path / "model.eqx", model)
    back = eqx.tree_deserialise_leaves(tmp_path / "model.eqx", frozen)
    assert type(back.bn) is type(frozen.bn)
    y, same = _eqx_forward(back, state)
    ref = reference(model.dense0.weight.T, model.dense0.bias, model.bn.weight, model.bn.bias,
                    model.dense1.weight.T, model.dense1.bias, mean=np.zeros(3), var=np.ones(3))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    assert same.get(model.bn.batch_counter) == 0


def test_linen_convert_and_jit_cache():
    """`convert` (which `freeze` takes): a function jitted outside it runs converted inside it, and plain outside."""
    model = nn.BatchNorm(use_running_average=False, momentum=0.0)  # flax's own layer: E[x^2] - E[x]^2
    x = 1e4 + jnp.array([[-1.0], [1.0]])
    variables = model.init(jax.random.key(0), x)
    step = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"])[1]["batch_stats"]["var"])
    assert step(variables, x).tolist() == [0.0]                                      # flax's, traced first
    assert jaxbn.linen.convert(step)(variables, x).tolist() == [1.0]                 # float64: exactly 1
    apply = jaxbn.linen.convert(jax.jit(model.apply, static_argnames="mutable"), momentum=0.5)
    assert apply(variables, x, mutable=("batch_stats",))[1]["batch_stats"]["var"].tolist() == [1.0]  # .5 + .5 * 1
    assert step(variables, x).tolist() == [0.0]
