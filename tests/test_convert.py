"""`convert` in each framework: a model built with the framework's own BatchNorm runs jaxbn's, unedited.

Each converted model is checked against an independent float64 numpy
reference (`tests/reference.py`) or against the unconverted model's
documented behaviour: the same variables, params or state (checkpoints load
both ways), the statistics of the whole batch across devices, masks, inf
batches, and the composition with `freeze`, accumulation and
`recompute_batch_stats`. The models are tiny: these tests compile a few
programs each.
"""

from __future__ import annotations

import functools
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn.linen
from tests import reference as ref
from tests.data.linen_resnet import ResNet18

DEVICES = 8


def shapes(tree):
    return jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), tree)


def numpy_init(init, *args, seed=0):
    """Variables of the tree `init(key, *args)` makes, drawn by numpy (jax.random compiles slowly on CPU):
    kernels N(0, 1/fan_in), scales 1, biases and means 0, variances 1."""
    rng = np.random.default_rng(seed)
    tree = jax.eval_shape(init, jax.random.key(0), *args)

    def fill(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[-1] in ("kernel", "w"):
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
        one = keys[-1] in ("scale", "var") or (keys[-1] == "average" and keys[-2].endswith("var_ema"))
        return np.full(leaf.shape, 1.0 if one else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, tree)


# ---------------------------------------------------------------------------------------------- Linen


@pytest.fixture(scope="module")
def resnet():
    """flax-style ResNet-18 (8 filters), its variables from flax's own init, and a 16-image batch."""
    model = ResNet18(num_classes=3, num_filters=8)
    x = ref.normal(0, (DEVICES * 2, 32, 32, 3)) * 2.0 + 3.0
    return model, numpy_init(model.init, x[:2]), x


def _is_conv_init(module, method_name):
    return module.name == "conv_init"


@pytest.fixture(scope="module")
def resnet_steps(resnet, eight_devices_module):
    """One training step of the converted ResNet (axis_name="batch") under 8-device pmap, on a clean batch
    and on a batch holding one inf; the first layer's input captured."""
    model, variables, x = resnet
    apply = jaxbn.linen.convert(model.apply, axis_name="batch")

    def step(v, x):
        _, out = apply(v, x, train=True, mutable=["batch_stats", "intermediates"],
                       capture_intermediates=_is_conv_init)
        return out["batch_stats"], out["intermediates"]["conv_init"]["__call__"][0]

    pstep = jax.pmap(step, axis_name="batch", in_axes=(None, 0))
    rep = variables
    xs = x.reshape(DEVICES, 2, *x.shape[1:])
    x_inf = xs.copy()
    x_inf[3, 1, 5, 7, 0] = np.inf
    return pstep(rep, xs), pstep(rep, x_inf)


@pytest.fixture(scope="module")
def eight_devices_module():
    from tests.conftest import require_devices

    require_devices(DEVICES)
    return jax.devices()[:DEVICES]


def test_linen_resnet_sync_bn_without_an_edit(resnet, resnet_steps):
    """The variable tree is flax's, the running statistics are those of the global batch (float64)."""
    model, variables, x = resnet
    (stats, conv_out), _ = resnet_steps
    assert shapes(jax.tree.map(lambda a: a[0], stats)) == shapes(variables["batch_stats"])
    # Every device holds the same statistics: the whole batch's.
    for leaf in jax.tree.leaves(stats):
        np.testing.assert_array_equal(np.asarray(leaf), np.broadcast_to(np.asarray(leaf)[0], leaf.shape))
    first = np.asarray(conv_out, np.float64).reshape(-1, conv_out.shape[-1])  # (16 * 16 * 16, 8), all devices
    mean, var, n = ref.moments(first)
    want_mean, want_var, _ = ref.update(0.0, 1.0, 0, mean, var, n, momentum=0.9)
    np.testing.assert_allclose(stats["bn_init"]["mean"][0], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["bn_init"]["var"][0], want_var, rtol=1e-5)
    # One device's moments alone would not give them.
    local = ref.moments(np.asarray(conv_out[0], np.float64).reshape(-1, conv_out.shape[-1]))
    assert np.max(np.abs(ref.update(0.0, 1.0, 0, *local, momentum=0.9)[1] - want_var)) > 1e-3


def test_linen_resnet_inf_batch_keeps_stats_finite(resnet, resnet_steps, eight_devices_module):
    """One inf in the batch: every converted running statistic stays finite; flax's own layers turn NaN."""
    model, variables, x = resnet
    _, (stats, _) = resnet_steps
    assert all(bool(np.all(np.isfinite(leaf))) for leaf in jax.tree.leaves(stats))
    # The layers hit by the inf keep their old values exactly.
    np.testing.assert_array_equal(stats["bn_init"]["var"][0], variables["batch_stats"]["bn_init"]["var"])

    x_inf = x.copy()
    x_inf[7, 5, 7, 0] = np.inf
    _, theirs = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x_inf)
    assert not np.all(np.isfinite(theirs["batch_stats"]["bn_init"]["var"]))


class MaskedNet(nn.Module):
    """A model written for sync-BN that passes its own mask to flax's BatchNorm."""

    @nn.compact
    def __call__(self, x, mask=None, train=True):
        y = nn.BatchNorm(use_running_average=not train, momentum=0.5, axis_name="batch")(x, mask=mask)
        return nn.Dense(2)(y)


def _uneven_masks():
    x = ref.normal(1, (DEVICES, 4, 3)) + 100.0
    mask = np.ones((DEVICES, 4, 1), bool)
    mask[0] = False  # device 0: nothing valid
    mask[1, 1:] = False  # device 1: one valid example
    mask[2, ::2] = False
    return x, mask


def test_linen_uneven_masks_one_device_fully_masked(eight_devices_module):
    """flax's layer gives NaN when one device's shard is all masked; converted, the global masked statistics."""
    model = MaskedNet()
    x, mask = _uneven_masks()
    variables = numpy_init(model.init, x[0], mask[0])

    def step(apply):
        def run(v, x, m):
            return apply(v, x, m, mutable=["batch_stats"])[1]["batch_stats"]["BatchNorm_0"]

        return jax.pmap(run, axis_name="batch", in_axes=(None, 0, 0))(variables, x, mask)

    theirs, ours = step(model.apply), step(jaxbn.linen.convert(model.apply))
    assert not np.all(np.isfinite(np.asarray(theirs["mean"])))
    mean, var, n = ref.moments(x.reshape(-1, 3), mask=mask.reshape(-1, 1))
    want = ref.update(0.0, 1.0, 0, mean, var, n, momentum=0.5)
    for dev in range(DEVICES):
        np.testing.assert_allclose(ours["mean"][dev], want[0], rtol=1e-6)
        np.testing.assert_allclose(ours["var"][dev], want[1], rtol=1e-4)


def test_linen_batch_mask_reaches_every_converted_layer(eight_devices_module):
    """A model that passes no mask: `batch_mask` masks the padded examples in every converted layer."""
    model = MaskedNet()
    x, mask = _uneven_masks()
    variables = numpy_init(model.init, x[0])
    apply = jaxbn.linen.convert(model.apply)

    def run(v, x, m):
        with jaxbn.linen.batch_mask(m[:, 0]):  # per example
            return apply(v, x, mutable=["batch_stats"])[1]["batch_stats"]["BatchNorm_0"]

    ours = jax.pmap(run, axis_name="batch", in_axes=(None, 0, 0))(variables, x, mask)
    mean, var, n = ref.moments(x.reshape(-1, 3), mask=mask.reshape(-1, 1))
    want = ref.update(0.0, 1.0, 0, mean, var, n, momentum=0.5)
    np.testing.assert_allclose(ours["mean"][0], want[0], rtol=1e-6)
    np.testing.assert_allclose(ours["var"][0], want[1], rtol=1e-4)
    with pytest.raises(ValueError, match="first axes"):
        with jaxbn.linen.batch_mask(np.ones(5, bool)):
            apply(variables, x[0], mutable=["batch_stats"])
    with pytest.raises(TypeError, match="boolean"):
        with jaxbn.linen.batch_mask(np.ones(4)):
            pass


class SmallNet(nn.Module):
    """Dense, flax's BatchNorm (used twice: shared variables), Dense: a model with flax's layers only."""

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        return nn.Dense(2)(nn.relu(x))


@pytest.fixture(scope="module")
def small():
    model = SmallNet()
    x = ref.normal(2, (16, 3)) + 1e3
    return model, numpy_init(model.init, x), x


def _dense(v, x):
    return np.asarray(x, np.float64) @ np.asarray(v["kernel"], np.float64) + np.asarray(v["bias"], np.float64)


def test_linen_round_trip_checkpoints(small):
    """flax's variables load into the converted model, its updated ones back into flax's: same tree, same
    inference outputs; the converted init makes flax's tree."""
    model, variables, x = small
    converted = jaxbn.linen.convert(model.apply)
    assert shapes(jax.eval_shape(jaxbn.linen.convert(model.init), jax.random.key(0), x)) == shapes(variables)
    _, updates = converted(variables, x, mutable=["batch_stats"])
    trained = {**variables, **updates}
    assert shapes(trained) == shapes(variables)
    h = _dense(variables["params"]["Dense_0"], x)
    mean, var, n = ref.moments(h)
    want_mean, want_var, _ = ref.update(0.0, 1.0, 0, mean, var, n, momentum=0.8)
    np.testing.assert_allclose(trained["batch_stats"]["BatchNorm_0"]["mean"], want_mean, rtol=1e-6)
    np.testing.assert_allclose(trained["batch_stats"]["BatchNorm_0"]["var"], want_var, rtol=1e-4)
    ours = converted(trained, x, train=False)
    theirs = model.apply(trained, x, train=False)  # flax's own layers on the converted model's checkpoint
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_linen_freeze_accumulate_recompute_compose(small):
    """freeze(convert(apply)) normalizes with the stored statistics; MOMENTS pools and commits the whole
    batch's update; convert(recompute_batch_stats) stores the population statistics (float64)."""
    model, variables, x = small
    h = _dense(variables["params"]["Dense_0"], x)
    stats = {"BatchNorm_0": {"mean": jnp.full(4, 1e3, jnp.float32), "var": jnp.full(4, 4.0, jnp.float32)}}
    v = {**variables, "batch_stats": stats}

    frozen = jaxbn.linen.freeze(jaxbn.linen.convert(model.apply))
    y, updates = frozen(v, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(updates["batch_stats"]["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"])
    z = ref.normalize(h, 1e3, 4.0)  # scale 1, bias 0
    want = _dense(variables["params"]["Dense_1"], np.maximum(z, 0.0))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)

    converted = jaxbn.linen.convert(model.apply)
    halves = (x[:8], x[8:])
    _, pool = converted(v, halves[0], mutable=[jaxbn.linen.MOMENTS])
    _, pool = converted({**v, **pool}, halves[1], mutable=[jaxbn.linen.MOMENTS])
    committed, _ = jaxbn.linen.commit_moments(v["batch_stats"], pool[jaxbn.linen.MOMENTS])
    mean, var, n = ref.moments(h)
    want_mean, want_var, _ = ref.update(1e3, 4.0, 0, mean, var, n, momentum=0.8)
    np.testing.assert_allclose(committed["BatchNorm_0"]["mean"], want_mean, rtol=1e-6)
    np.testing.assert_allclose(committed["BatchNorm_0"]["var"], want_var, rtol=1e-4)

    recompute = jaxbn.linen.convert(jaxbn.linen.recompute_batch_stats)
    precise = recompute(model, v, list(halves), train=False)
    np.testing.assert_allclose(precise["batch_stats"]["BatchNorm_0"]["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(precise["batch_stats"]["BatchNorm_0"]["var"], var, rtol=1e-4)
    assert shapes(precise) == shapes(v)


def test_linen_overrides_and_no_batch_norm(small):
    model, variables, x = small
    with pytest.raises(TypeError, match="axis_nam"):
        jaxbn.linen.convert(model.apply, axis_nam="batch")
    with pytest.raises(ValueError, match="strategy"):
        jaxbn.linen.convert(model.apply, strategy="sum")
    dense = nn.Dense(2)
    v = numpy_init(dense.init, x)
    apply = jaxbn.linen.convert(dense.apply)
    with pytest.warns(UserWarning, match="no flax.linen.BatchNorm found"):
        apply(v, x)
    apply(v, x)  # once only
    # The overrides reach the layer: momentum=0 stores the batch's statistics.
    _, updates = jaxbn.linen.convert(model.apply, momentum=0.0)(variables, x, mutable=["batch_stats"])
    mean, _, _ = ref.moments(_dense(variables["params"]["Dense_0"], x))
    np.testing.assert_allclose(updates["batch_stats"]["BatchNorm_0"]["mean"], mean, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- Haiku

hk = pytest.importorskip("haiku")
import jaxbn.haiku  # noqa: E402


def _resnet_forward(x, is_training):
    """hk.nets.ResNet18, unedited; returns the logits and the input of its first batch norm."""
    seen = []

    def record(next_f, args, kwargs, context):
        if context.method_name == "__call__" and context.module.module_name.endswith("initial_batchnorm"):
            seen.append(args[0])
        return next_f(*args, **kwargs)

    with hk.intercept_methods(record):
        logits = hk.nets.ResNet18(3)(x, is_training)
    return logits, seen[0]


@pytest.fixture(scope="module")
def haiku_resnet():
    x = ref.normal(3, (4, 16, 16, 3)) * 3.0 + 5.0
    theirs = hk.transform_with_state(_resnet_forward)
    ours = hk.transform_with_state(jaxbn.haiku.convert(_resnet_forward))
    with jax.numpy_dtype_promotion("standard"):  # haiku's own EMA (decay ** counter) needs it
        params, state = numpy_init(lambda key, x: theirs.init(key, x, True), x)
    return theirs, ours, params, state, x


def test_haiku_resnet18_converted(haiku_resnet):
    """hk.nets.ResNet18: the same params and state trees; a training step's statistics against float64; the
    state after it loads into haiku's own model (same eval outputs); freeze keeps the statistics fixed."""
    theirs, ours, params, state, x = haiku_resnet
    assert shapes(jax.eval_shape(lambda k, x: ours.init(k, x, True), jax.random.key(0), x)) == shapes((params, state))
    step = jax.jit(lambda p, s, x: ours.apply(p, s, None, x, True))
    (_, first_input), new_state = step(params, state, x)
    assert shapes(new_state) == shapes(state)
    name = "res_net18/~/initial_batchnorm"
    mean, var, _ = ref.moments(first_input)
    # haiku's zero-debiased EMA: the first update's average is the batch's value itself.
    np.testing.assert_allclose(new_state[name + "/~/mean_ema"]["average"].ravel(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state[name + "/~/var_ema"]["average"].ravel(), var, rtol=1e-4)
    assert int(new_state[name + "/~/var_ema"]["counter"]) == 1

    evaluate = jax.jit(lambda f, p, s, x: f.apply(p, s, None, x, False)[0][0], static_argnums=0)
    with jax.numpy_dtype_promotion("standard"):
        haiku_logits = evaluate(theirs, params, new_state, x)  # haiku's own layers on the converted state
    np.testing.assert_allclose(evaluate(ours, params, new_state, x), haiku_logits, rtol=1e-4, atol=1e-4)

    frozen = hk.transform_with_state(jaxbn.haiku.freeze(jaxbn.haiku.convert(_resnet_forward)))
    _, kept = jax.jit(lambda p, s, x: frozen.apply(p, s, None, x, True))(params, new_state, x)
    jax.tree.map(np.testing.assert_array_equal, kept, new_state)


def test_haiku_sync_bn_mask_and_accumulate():
    """axis_name under jax.vmap: the whole batch's statistics with a batch_mask; accumulation pools them."""

    def forward(x):
        return hk.BatchNorm(True, True, decay_rate=0.5)(x, is_training=True)

    x = ref.normal(4, (4, 3, 2)) + 1e4  # 4 replicas of 3 examples, 2 features
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 0, 1]], bool)
    f = hk.transform_with_state(jaxbn.haiku.convert(forward, axis_name="i"))
    params, state = hk.transform_with_state(jaxbn.haiku.convert(forward)).init(None, x[0])  # no axis to bind

    def run(state, x, m):
        with jaxbn.haiku.batch_mask(m):
            return f.apply(params, state, None, x)[1]

    step = jax.jit(jax.vmap(run, axis_name="i", in_axes=(None, 0, 0), out_axes=None))
    new = step(state, x, mask)
    mean, var, _ = ref.moments(x.reshape(-1, 2), mask=mask.reshape(-1, 1))
    np.testing.assert_allclose(new["batch_norm/~/mean_ema"]["average"].ravel(), mean, rtol=1e-6)
    np.testing.assert_allclose(new["batch_norm/~/var_ema"]["average"].ravel(), var, rtol=1e-4)

    acc = jaxbn.haiku.accumulate(state)
    acc = step(acc, x, mask)
    committed = jaxbn.haiku.accumulate(jaxbn.haiku.commit_moments(acc), enable=False)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5), committed, new)


def test_haiku_overrides_and_no_batch_norm():
    with pytest.raises(TypeError, match="axis_nam"):
        jaxbn.haiku.convert(lambda x: x, axis_nam="i")
    with pytest.raises(TypeError, match="create_scale"):
        jaxbn.haiku.convert(lambda x: x, create_scale=False)
    with pytest.raises(TypeError, match="not both"):
        jaxbn.haiku.convert(lambda x: x, axis_name="i", cross_replica_axis="i")
    f = hk.transform(jaxbn.haiku.convert(lambda x: hk.Linear(2)(x)))
    with pytest.warns(UserWarning, match="no haiku.BatchNorm found"):
        f.init(jax.random.key(0), np.ones((2, 3), np.float32))


# ---------------------------------------------------------------------------------------------- NNX

from flax import nnx  # noqa: E402

import jaxbn.nnx  # noqa: E402

OFFSET = 1e3


class NnxNet(nnx.Module):
    """flax.nnx's own BatchNorm on the input, then a Linear layer."""

    def __init__(self):
        self.bn = nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
        self.head = nnx.Linear(3, 2, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.head(self.bn(x))


def _sgd_reference(x, kernel, bias, lr, momentum, mean0=0.0, var0=1.0):
    """float64: one SGD step on mean((bn(x) @ kernel + bias)^2) (batch statistics, scale 1, offset 0):
    the new running (mean, var) and the head's new kernel."""
    mean, var, n = ref.moments(x)
    z = ref.normalize(x, mean, var)
    y = z @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
    grad = z.T @ (2.0 * y / y.size)
    stats = ref.update(mean0, var0, 0, mean, var, n, momentum=momentum)
    return stats[0], stats[1], np.asarray(kernel, np.float64) - lr * grad


def test_nnx_converted_trains_at_an_offset():
    """Converted in place with the same Variable objects; one training step at a 1e3 offset against float64;
    the state loads into an unconverted model and back."""
    model = NnxNet()
    before = nnx.state(model)
    mean_var = model.bn.mean
    assert jaxbn.nnx.convert(model) is model
    assert isinstance(model.bn, jaxbn.nnx.BatchNorm) and model.bn.mean is mean_var
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(before)

    x = ref.normal(5, (32, 3)) + OFFSET
    kernel, bias = np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...])

    @nnx.jit
    def step(model, x):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))

    step(model, x)
    want_mean, want_var, want_kernel = _sgd_reference(x, kernel, bias, 0.1, 0.9)
    np.testing.assert_allclose(model.bn.mean[...], want_mean, rtol=1e-6)
    np.testing.assert_allclose(model.bn.var[...], want_var, rtol=1e-4)
    np.testing.assert_allclose(model.head.kernel[...], want_kernel, rtol=1e-4, atol=1e-5)

    theirs = NnxNet()  # flax's own layers, loading the converted model's state, and back
    nnx.update(theirs, nnx.state(model))
    theirs.eval(), model.eval()
    np.testing.assert_allclose(model(x), theirs(x), rtol=1e-5, atol=1e-5)
    back = jaxbn.nnx.convert(NnxNet())
    nnx.update(back, nnx.state(theirs))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(back), nnx.state(model))

    model.train()
    jaxbn.nnx.freeze(model)(x + 5.0)
    np.testing.assert_allclose(model.bn.mean[...], want_mean, rtol=1e-6)


def test_nnx_overrides_and_no_batch_norm():
    model = NnxNet()
    with pytest.raises(TypeError, match="use_bias"):
        jaxbn.nnx.convert(model, use_bias=False)
    with pytest.raises(ValueError, match="strategy"):
        jaxbn.nnx.convert(model, strategy="sum")
    assert isinstance(model.bn, nnx.BatchNorm)  # nothing changed by the failed calls
    assert jaxbn.nnx.convert(model, axis_name="batch").bn.axis_name == "batch"
    with pytest.warns(UserWarning, match="no flax.nnx.BatchNorm found"):
        jaxbn.nnx.convert(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------- Equinox

eqx = pytest.importorskip("equinox")
import jaxbn.equinox  # noqa: E402


class EqxNet(eqx.Module):
    """equinox's own BatchNorm on one example, then a Linear layer."""

    bn: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        self.bn = eqx.nn.BatchNorm(3, "batch", momentum=0.9, mode="batch")
        self.head = eqx.nn.Linear(3, 2, key=key)

    def __call__(self, x, state):
        y, state = self.bn(x, state)
        return self.head(y), state


def _arrays(model):
    return jax.tree.leaves(eqx.filter(model, eqx.is_array))


def test_equinox_converted_trains_at_an_offset():
    """A new model on equinox's own state (same leaves); one training step at a 1e3 offset against float64;
    the state and leaves load back into equinox's model."""
    theirs, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    model = jaxbn.equinox.convert(theirs)
    assert isinstance(model.bn, jaxbn.equinox.BatchNorm) and isinstance(theirs.bn, eqx.nn.BatchNorm)
    assert model.bn.batch_state_index.marker == theirs.bn.batch_state_index.marker
    assert shapes(_arrays(model)) == shapes(_arrays(theirs))
    x = ref.normal(6, (32, 3)) + OFFSET
    kernel, bias = np.asarray(model.head.weight).T, np.asarray(model.head.bias)

    @eqx.filter_jit
    def step(model, state, x):
        def loss(m):
            y, new = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
            return jnp.mean(y**2), new

        grads, new = eqx.filter_grad(loss, has_aux=True)(model)
        return eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads)), new

    model, state = step(model, state, x)
    want_mean, want_var, want_kernel = _sgd_reference(x, kernel, bias, 0.1, 0.9)
    mean, var = state.get(model.bn.batch_state_index)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(model.head.weight).T, want_kernel, rtol=1e-4, atol=1e-5)

    # Back into equinox's model through an eqx.tree_serialise_leaves checkpoint; inference on the same state.
    checkpoint = io.BytesIO()
    eqx.tree_serialise_leaves(checkpoint, (model, state))
    checkpoint.seek(0)
    back, back_state = eqx.tree_deserialise_leaves(checkpoint, (theirs, state))
    jax.tree.map(np.testing.assert_array_equal, _arrays(back), _arrays(model))
    jax.tree.map(np.testing.assert_array_equal, back_state, state)
    infer = jax.vmap(lambda m, x: eqx.nn.inference_mode(m)(x, state)[0], in_axes=(None, 0), axis_name="batch")
    w, b = np.asarray(model.head.weight, np.float64).T, np.asarray(model.head.bias, np.float64)
    affine = (np.asarray(model.bn.weight), np.asarray(model.bn.bias))
    np.testing.assert_allclose(infer(model, x), ref.normalize(x, mean, var, *affine) @ w + b, rtol=1e-4, atol=1e-4)
    # equinox's "batch" mode divides both statistics by 1 - momentum**steps (documented, docs/equinox.md).
    debiased = ref.normalize(x, np.asarray(mean) / 0.1, np.asarray(var) / 0.1, *affine) @ w + b
    np.testing.assert_allclose(infer(back, x), debiased, rtol=1e-4, atol=1e-4)
    _, kept = jax.vmap(jaxbn.equinox.freeze(model), axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state)
    jax.tree.map(np.testing.assert_array_equal, kept, state)


def test_equinox_overrides_and_no_batch_norm():
    with pytest.raises(TypeError, match="strategy"):
        jaxbn.equinox.convert(eqx.nn.Identity(), strategy="psum")
    with pytest.warns(UserWarning, match="no equinox.nn.BatchNorm found"):
        jaxbn.equinox.convert(eqx.nn.Identity())
    model, _ = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    assert jaxbn.equinox.convert(model, axis_name=("data", "batch")).bn.axis_name == ("data", "batch")
