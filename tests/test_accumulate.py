"""Gradient accumulation: pooled moments and one running-stat update per optimizer step.

Every test checks the statistics after k micro-batches against ONE update (tests/reference.py, float64)
with the moments of the whole batch: each layer's inputs over all micro-batches taken together, the model
normalizing each micro-batch with its own moments as in training.
"""

import os
import re

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn
import jaxbn.equinox
import jaxbn.haiku
import jaxbn.linen
import jaxbn.nnx
from tests import reference as ref

SIZES = (5, 8, 3)  # unequal micro-batches: the pool is count-weighted
K = len(SIZES)


def _micro_batches(features=2, seed=0):
    rng = np.random.default_rng(seed)
    xs = [(2.0 + 3.0 * rng.normal(size=(n, features))).astype(np.float32) for n in SIZES]
    masks = [rng.random((n, 1)) < 0.7 for n in SIZES]
    masks[0][:2] = True  # every micro-batch keeps valid rows
    return xs, masks


# ---------------------------------------------------------------- functional API


def test_combine_moments_equals_moments_of_concatenation():
    rng = np.random.default_rng(1)
    xs = [1e3 + rng.normal(size=(n, 3)).astype(np.float32) for n in SIZES]
    masks = [rng.random((n, 3)) < 0.6 for n in SIZES]
    masks[2][:] = False  # a micro-batch with nothing valid changes nothing
    parts = [jaxbn.moments(x, mask=m) for x, m in zip(xs, masks, strict=True)]
    pooled = jaxbn.combine_moments(*parts)
    mean, var, n = ref.moments(np.concatenate(xs), mask=np.concatenate(masks))
    np.testing.assert_allclose(pooled.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(pooled.var, var, rtol=1e-3)
    np.testing.assert_array_equal(pooled.count, n)
    assert pooled.count.dtype == jnp.float32 and pooled.mean.dtype == jnp.float32

    stacked = jax.tree.map(lambda *v: jnp.stack(v), *parts)
    from_stack = jaxbn.combine_moments(stacked, stacked=True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), from_stack, pooled)
    # pairwise, from the empty pool (a scan carry), in any order
    acc = jaxbn.empty_moments(3)
    for p in parts[::-1]:
        acc = jax.jit(jaxbn.combine_moments)(acc, p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), acc, pooled)
    # trees of Moments (one per layer) pool leaf by leaf
    tree = jaxbn.combine_moments({"a": parts[0], "b": [parts[1]]}, {"a": parts[1], "b": [parts[0]]})
    np.testing.assert_allclose(tree["a"].var, tree["b"][0].var, rtol=1e-6)


def test_combine_moments_complex_and_nonfinite():
    z = ref.normal(2, (6, 2), np.complex64)
    pooled = jaxbn.combine_moments(jaxbn.empty_moments(2), jaxbn.moments(z[:4]), jaxbn.moments(z[4:]))
    mean, var, _ = ref.moments(z)
    np.testing.assert_allclose(pooled.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(pooled.var, var, rtol=1e-5)
    assert pooled.mean.dtype == jnp.complex64 and pooled.var.dtype == jnp.float32
    # a NaN in one micro-batch poisons that feature's pool, as it would the whole batch; update_stats skips it
    x = np.ones((4, 2), np.float32)
    x[0, 1] = np.nan
    bad = jaxbn.combine_moments(jaxbn.moments(x[:2]), jaxbn.moments(x[2:]))
    assert np.isfinite(bad.mean[0]) and not np.isfinite(bad.mean[1])
    stats, _ = jaxbn.commit_moments(jaxbn.init_stats(2), bad, momentum=0.5)
    np.testing.assert_array_equal(stats.mean, [0.5, 0.0])


@pytest.mark.parametrize("momentum,unbiased", [(0.9, False), (None, True)])
def test_commit_moments_is_one_update_with_the_whole_batch(momentum, unbiased, maybe_jit):
    xs, masks = _micro_batches(3)
    start = jaxbn.init_stats(3)._replace(count=jnp.asarray(2, jnp.int32))

    def step(stats, pool, x, m, last):
        pool = jaxbn.combine_moments(pool, jaxbn.moments(x, mask=m))
        return jaxbn.commit_moments(stats, pool, apply=last, momentum=momentum, unbiased=unbiased)

    step = maybe_jit(step)
    stats, pool = start, jaxbn.empty_moments(3)
    for i, (x, m) in enumerate(zip(xs, masks, strict=True)):
        stats, pool = step(stats, pool, x, m, jnp.asarray(i == K - 1))
        if i < K - 1:
            jax.tree.map(np.testing.assert_array_equal, stats, start)
    mean, var, n = ref.moments(np.concatenate(xs), mask=np.concatenate(masks))
    want = ref.update(0.0, 1.0, 2, mean, var, n, momentum=momentum, unbiased=unbiased)
    np.testing.assert_allclose(stats.mean, want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, want[1], rtol=1e-5)
    assert int(stats.count) == want[2] == 3
    np.testing.assert_array_equal(pool.count, 0.0)  # emptied for the next step


def test_accumulate_errors():
    m = jaxbn.moments(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="at least one Moments"):
        jaxbn.combine_moments()
    with pytest.raises(ValueError, match=r"one feature shape, got \[\(2,\), \(3,\)\]"):
        jaxbn.combine_moments(m, jaxbn.moments(jnp.ones((2, 2))))
    with pytest.raises(TypeError, match="pytrees whose leaves are jaxbn.Moments"):
        jaxbn.combine_moments(jnp.ones(3))
    with pytest.raises(ValueError, match="pytrees of one structure"):
        jaxbn.combine_moments({"a": m}, {"b": m})
    with pytest.raises(ValueError, match="leading axis of parts"):
        jaxbn.combine_moments(jaxbn.Moments(*(jnp.ones(()),) * 3), stacked=True)
    with pytest.raises(ValueError, match=r"apply must be a bool .* got dtype int32 with shape \(2,\)"):
        jaxbn.commit_moments(jaxbn.init_stats(3), m, apply=jnp.ones(2, jnp.int32))
    with pytest.raises(ValueError, match="feature_shape must be non-negative ints"):
        jaxbn.empty_moments(-1)
    with pytest.raises(ValueError, match="feature_shape must be non-negative ints"):
        jaxbn.empty_moments(True)


def test_empty_moments_takes_the_feature_shapes_init_stats_takes():
    """numpy integers (a shape read off an array) are feature shapes, as for init_stats."""
    for shape in (np.int64(3), (np.int32(2), 3), np.array([2, 3])):
        want = np.shape(jaxbn.init_stats(shape).mean)
        m = jaxbn.empty_moments(shape)
        assert m.mean.shape == m.var.shape == m.count.shape == want
        assert not np.any(np.asarray(m.count))


# ---------------------------------------------------------------- Linen and NNX: a two-layer model


def _hand(xs, masks, k1, b1, s1, c1, k2, b2):
    """Each BatchNorm's input over every micro-batch (float64), each micro-batch normalized with its own
    masked moments, as training does."""
    h1s, h2s = [], []
    for x, m in zip(xs, masks, strict=True):
        h1 = np.asarray(x, np.float64) @ k1 + b1
        mean, var, _ = ref.moments(h1, mask=m)
        z = np.maximum(ref.normalize(h1, mean, var, s1, c1), 0.0)
        h1s.append(h1)
        h2s.append(z @ k2 + b2)
    return np.concatenate(h1s), np.concatenate(h2s)


def _check_stats(got1, got2, xs, masks, p, start_count=0):
    """got1/got2: (mean, var[, count]) of the two layers; p: the float64 parameters by role."""
    h1, h2 = _hand(xs, masks, *p)
    m = np.concatenate(masks)
    mean1, var1, n1 = ref.moments(h1, mask=m)
    want1 = ref.update(0.0, 1.0, 0, mean1, var1, n1, momentum=0.9)
    mean2, var2, n2 = ref.moments(h2, mask=m)
    want2 = ref.update(0.0, 1.0, start_count, mean2, var2, n2, momentum=None, unbiased=True)
    np.testing.assert_allclose(got1[0], want1[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got1[1], want1[1], rtol=1e-5)
    np.testing.assert_allclose(got2[0], want2[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got2[1], want2[1], rtol=1e-5)
    assert int(got2[2]) == want2[2]


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, mask, train):
        x = nn.Dense(3)(x)
        x = nn.relu(jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x, mask=mask))
        x = nn.Dense(2)(x)
        return jaxbn.linen.BatchNorm(use_running_average=not train, momentum=None, unbiased=True)(x, mask=mask)


def _random_params(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + 0.5 * rng.normal(size=p.shape).astype(np.float32), params)


def _linen_setup():
    xs, masks = _micro_batches()
    model = LinenNet()
    v = model.init(jax.random.key(0), xs[0], masks[0], train=False)
    v = {"params": _random_params(v["params"], 3), "batch_stats": v["batch_stats"]}
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    roles = (p["Dense_0"]["kernel"], p["Dense_0"]["bias"], p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"],
             p["Dense_1"]["kernel"], p["Dense_1"]["bias"])
    return model, v, xs, masks, roles


def _linen_check(bs, xs, masks, roles):
    l1, l2 = bs["BatchNorm_0"], bs["BatchNorm_1"]
    _check_stats((l1["mean"], l1["var"]), (l2["mean"], l2["var"], l2["count"]), xs, masks, roles)


def test_linen_pooled_through_the_collection():
    model, v, xs, masks, roles = _linen_setup()
    pools = {}
    for x, m in zip(xs, masks, strict=True):
        y, upd = model.apply({**v, jaxbn.linen.MOMENTS: pools}, x, m, train=True, mutable=[jaxbn.linen.MOMENTS])
        pools = upd[jaxbn.linen.MOMENTS]
        # normalization stays per micro-batch: the output is what plain training gives
        y_train, _ = model.apply(v, x, m, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(y, y_train, rtol=1e-6, atol=1e-6)
    bs, emptied = jaxbn.linen.commit_moments(v["batch_stats"], pools)
    _linen_check(bs, xs, masks, roles)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), bs) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                          v["batch_stats"])
    assert all(float(jnp.max(leaf)) == 0.0 for leaf in jax.tree.leaves(emptied))


def test_linen_scan_over_micro_batches():
    model, v, xs, masks, roles = _linen_setup()
    # equal micro-batches for a scan; masks make them unequal in count
    x = np.concatenate(xs)[:15].reshape(3, 5, 2)
    m = np.concatenate(masks)[:15].reshape(3, 5, 1)

    @jax.jit
    def run(v, x, m):
        def body(_, xm):
            _, upd = model.apply(v, xm[0], xm[1], train=True, mutable=[jaxbn.linen.MOMENTS])
            return None, upd[jaxbn.linen.MOMENTS]

        _, per_micro = jax.lax.scan(body, None, (x, m))
        return jaxbn.linen.commit_moments(v["batch_stats"], jaxbn.combine_moments(per_micro, stacked=True))[0]

    _linen_check(run(v, x, m), list(x), list(m), roles)


def test_linen_with_optax_multisteps():
    model, v, xs, masks, roles = _linen_setup()
    opt = optax.MultiSteps(optax.sgd(0.0), every_k_schedule=K)  # lr 0: the weights stay those of the reference

    @jax.jit
    def train_step(params, batch_stats, pools, opt_state, x, m):
        def loss(params):
            y, upd = model.apply({"params": params, "batch_stats": batch_stats, jaxbn.linen.MOMENTS: pools},
                                 x, m, train=True, mutable=[jaxbn.linen.MOMENTS])
            return jnp.sum(y**2), upd[jaxbn.linen.MOMENTS]

        grads, pools = jax.grad(loss, has_aux=True)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's MultiSteps divides floats by an int32
            updates, opt_state = opt.update(grads, opt_state, params)
        batch_stats, pools = jaxbn.linen.commit_moments(batch_stats, pools, apply=opt.has_updated(opt_state))
        return optax.apply_updates(params, updates), batch_stats, pools, opt_state

    params, bs, opt_state = v["params"], v["batch_stats"], opt.init(v["params"])
    # empty pools of the right structure (count 0 pools nothing), without running the model
    shapes = jax.eval_shape(lambda: model.apply(v, xs[0], masks[0], train=True, mutable=[jaxbn.linen.MOMENTS])[1])
    pools = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[jaxbn.linen.MOMENTS])
    for i, (x, m) in enumerate(zip(xs, masks, strict=True)):
        params, new_bs, pools, opt_state = train_step(params, bs, pools, opt_state, x, m)
        if i < K - 1:
            jax.tree.map(np.testing.assert_array_equal, new_bs, bs)  # no update inside the step
        bs = new_bs
    _linen_check(bs, xs, masks, roles)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.d1 = nnx.Linear(2, 3, rngs=rngs)
        self.bn1 = jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=rngs)
        self.d2 = nnx.Linear(3, 2, rngs=rngs)
        self.bn2 = jaxbn.nnx.BatchNorm(2, momentum=None, unbiased=True, rngs=rngs)

    def __call__(self, x, mask):
        x = nnx.relu(self.bn1(self.d1(x), mask=mask))
        return self.bn2(self.d2(x), mask=mask)


def _nnx_setup():
    xs, masks = _micro_batches()
    model = NNXNet(nnx.Rngs(0))
    rng = np.random.default_rng(4)
    for layer in (model.d1, model.d2, model.bn1):
        for name in ("kernel", "bias", "scale"):
            var = getattr(layer, name, None)
            if var is not None:
                var[...] = var[...] + 0.5 * rng.normal(size=var[...].shape).astype(np.float32)
    roles = tuple(np.asarray(a[...], np.float64) for a in (model.d1.kernel, model.d1.bias, model.bn1.scale,
                                                          model.bn1.bias, model.d2.kernel, model.d2.bias))
    return model, xs, masks, roles


def _nnx_check(model, xs, masks, roles):
    _check_stats((model.bn1.mean[...], model.bn1.var[...]),
                 (model.bn2.mean[...], model.bn2.var[...], model.bn2.count[...]), xs, masks, roles)


def test_nnx_accumulate_and_commit():
    model, xs, masks, roles = _nnx_setup()
    jaxbn.nnx.accumulate(model)

    @nnx.jit
    def micro(model, x, m):
        return model(x, m)

    for x, m in zip(xs, masks, strict=True):
        micro(model, x, m)
        np.testing.assert_array_equal(model.bn1.mean[...], 0.0)  # untouched inside the step
    jaxbn.nnx.commit_moments(model)
    _nnx_check(model, xs, masks, roles)
    np.testing.assert_array_equal(model.bn1.pooled_count[...], 0.0)
    jaxbn.nnx.accumulate(model, enable=False)  # back to per-call updates, the pools gone
    assert not hasattr(model.bn1, "pooled_mean")
    before = np.array(model.bn1.mean[...])
    model(xs[0], masks[0])
    assert not np.array_equal(model.bn1.mean[...], before)


def test_nnx_scan_and_multisteps():
    model, xs, masks, roles = _nnx_setup()
    jaxbn.nnx.accumulate(model)
    opt = optax.MultiSteps(optax.sgd(0.0), every_k_schedule=K)

    @nnx.jit
    def train_step(model, opt_state, x, m):
        grads = nnx.grad(lambda model: jnp.sum(model(x, m) ** 2))(model)
        params = nnx.state(model, nnx.Param)
        with jax.numpy_dtype_promotion("standard"):  # optax's MultiSteps divides floats by an int32
            updates, opt_state = opt.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        jaxbn.nnx.commit_moments(model, apply=opt.has_updated(opt_state))
        return opt_state

    opt_state = opt.init(nnx.state(model, nnx.Param))
    for i, (x, m) in enumerate(zip(xs, masks, strict=True)):
        opt_state = train_step(model, opt_state, x, m)
        if i < K - 1:
            np.testing.assert_array_equal(model.bn1.mean[...], 0.0)
    _nnx_check(model, xs, masks, roles)

    # a lax.scan over equal micro-batches, committing after it
    model, _, _, roles = _nnx_setup()
    jaxbn.nnx.accumulate(model)
    x = np.concatenate(xs)[:15].reshape(3, 5, 2)
    m = np.concatenate(masks)[:15].reshape(3, 5, 1)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, m):
        def body(state, xm):
            mdl = nnx.merge(graphdef, state)
            mdl(*xm)
            return nnx.state(mdl), None

        state, _ = jax.lax.scan(body, state, (x, m))
        mdl = nnx.merge(graphdef, state)
        jaxbn.nnx.commit_moments(mdl)
        return nnx.state(mdl)

    nnx.update(model, run(state, x, m))
    _nnx_check(model, list(x), list(m), roles)


def test_module_errors():
    v = {"batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}}
    pools = {"Other": {"moments": jaxbn.linen.LayerMoments(jaxbn.empty_moments(2), 0.9, False)}}
    with pytest.raises(ValueError, match="batch_stats has no mean/var for the layer Other"):
        jaxbn.linen.commit_moments(v["batch_stats"], pools)
    with pytest.raises(ValueError, match="moments holds ndarray at x"):
        jaxbn.linen.commit_moments(v["batch_stats"], {"x": np.zeros(2)})
    model = NNXNet(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"call jaxbn.nnx.accumulate\(model\)"):
        jaxbn.nnx.commit_moments(model)
    with pytest.raises(ValueError, match="has no jaxbn.nnx.BatchNorm layer"):
        jaxbn.nnx.accumulate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def _docs_block(section, subsection):
    """The first ```python block under `## section` / `### subsection` of docs/recipes.md."""
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "recipes.md"), encoding="utf-8") as f:
        text = f.read()
    text = text[text.index(f"\n## {section}\n"):]
    text = text[text.index(f"\n### {subsection}\n"):]
    return re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)


def test_nnx_optimizer_recipe_of_the_docs():
    """docs/recipes.md's NNX recipe, as written there, with nnx.Optimizer and optax.MultiSteps: two optimizer
    steps of K micro-batches; the parameters move at each step boundary and the running statistics take one
    float64 whole-batch update per step, each with the parameters the step's micro-batches ran with."""
    recipe = _docs_block("Gradient accumulation", "Flax NNX")
    model, xs, masks, _ = _nnx_setup()
    xs2, masks2 = _micro_batches(seed=1)
    steps = [list(zip(xs, masks, strict=True)), list(zip(xs2, masks2, strict=True))]
    roles = []
    for micro_batches in steps:
        roles.append(tuple(np.asarray(a[...], np.float64) for a in (
            model.d1.kernel, model.d1.bias, model.bn1.scale, model.bn1.bias, model.d2.kernel, model.d2.bias)))
        names = {"model": model, "k": K, "micro_batches": micro_batches, "optax": optax, "nnx": nnx, "jaxbn": jaxbn,
                 "loss_fn": lambda model, batch: jnp.sum(model(*batch) ** 2)}
        with jax.numpy_dtype_promotion("standard"):  # optax's MultiSteps divides floats by an int32
            exec(compile(recipe, "docs/recipes.md", "exec"), names)
    assert all(np.max(np.abs(a - b)) > 1e-4 for a, b in zip(roles[0], roles[1], strict=True))  # the step moved them
    assert not hasattr(model.bn1, "pooled_mean")  # the recipe switched accumulation off again
    want1, want2 = (0.0, 1.0, 0), (0.0, 1.0, 0)
    for (x, m), p in zip(((xs, masks), (xs2, masks2)), roles, strict=True):
        h1, h2 = _hand(x, m, *p)
        every = np.concatenate(m)
        want1 = ref.update(*want1, *ref.moments(h1, mask=every), momentum=0.9)
        want2 = ref.update(*want2, *ref.moments(h2, mask=every), momentum=None, unbiased=True)
    for got, want in (((model.bn1.mean, model.bn1.var), want1), ((model.bn2.mean, model.bn2.var), want2)):
        np.testing.assert_allclose(got[0][...], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1][...], want[1], rtol=1e-5)
    assert int(model.bn2.count[...]) == want2[2] == 2


# Stacked layers with momentum=None: one count per layer, each layer committed with its own count.

_STACK_COUNT = np.array([0, 3], np.int32)


def _stack_hand(xs, kernels, biases):
    """Each of the two stacked layers' input over every micro-batch (float64): layer 1 takes layer 0's
    output, normalized with its micro-batch's moments (scale 1, bias 0), through a Dense (kernels[0], biases[0])."""
    h0 = [np.asarray(x, np.float64) for x in xs]
    h1 = [ref.normalize(h, *ref.moments(h)[:2]) @ kernels[0] + biases[0] for h in h0]
    return np.concatenate(h0), np.concatenate(h1)


def _stack_check(mean, var, count, old_mean, old_var, xs, kernels, biases):
    for layer, h in enumerate(_stack_hand(xs, kernels, biases)):
        want = ref.update(old_mean[layer], old_var[layer], _STACK_COUNT[layer], *ref.moments(h), momentum=None)
        np.testing.assert_allclose(mean[layer], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var[layer], want[1], rtol=1e-5)
        assert int(count[layer]) == want[2]


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(2)(jaxbn.linen.BatchNorm(use_running_average=False, momentum=None)(x)), None


def test_linen_stacked_cumulative_layers_commit_each_with_its_count():
    model = nn.scan(_LinenBlock, variable_axes={True: 0}, split_rngs={"params": True}, length=2)()
    xs, _ = _micro_batches()
    v = model.init(jax.random.key(0), xs[0], None)
    rng = np.random.default_rng(5)
    old_mean, old_var = rng.normal(size=(2, 2)), 1.0 + rng.random((2, 2))
    bs = {"BatchNorm_0": {"mean": jnp.asarray(old_mean, jnp.float32), "var": jnp.asarray(old_var, jnp.float32),
                          "count": jnp.asarray(_STACK_COUNT)}}
    v = {"params": v["params"], "batch_stats": bs}
    pools = {}
    for x in xs:
        _, upd = model.apply({**v, jaxbn.linen.MOMENTS: pools}, x, None, mutable=[jaxbn.linen.MOMENTS])
        pools = upd[jaxbn.linen.MOMENTS]
    new, _ = jaxbn.linen.commit_moments(bs, pools)
    dense = v["params"]["Dense_0"]
    _stack_check(new["BatchNorm_0"]["mean"], new["BatchNorm_0"]["var"], new["BatchNorm_0"]["count"], old_mean,
                 old_var, xs, np.asarray(dense["kernel"], np.float64), np.asarray(dense["bias"], np.float64))


class _NNXBlock(nnx.Module):
    def __init__(self, key):
        rngs = nnx.Rngs(key)
        self.bn = jaxbn.nnx.BatchNorm(2, momentum=None, rngs=rngs)
        self.dense = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.bn(x))


class _NNXStack(nnx.Module):
    def __init__(self):
        self.blocks = nnx.vmap(_NNXBlock, in_axes=0, out_axes=0)(jax.random.split(jax.random.key(0), 2))

    def __call__(self, x):
        return nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)


def test_nnx_stacked_cumulative_layers_commit_each_with_its_count():
    model = _NNXStack()
    bn = model.blocks.bn
    rng = np.random.default_rng(5)
    old_mean, old_var = rng.normal(size=(2, 2)), 1.0 + rng.random((2, 2))
    bn.mean[...], bn.var[...], bn.count[...] = (jnp.asarray(old_mean, jnp.float32),
                                                 jnp.asarray(old_var, jnp.float32), jnp.asarray(_STACK_COUNT))
    jaxbn.nnx.accumulate(model)
    xs, _ = _micro_batches()
    for x in xs:
        model(x)
    jaxbn.nnx.commit_moments(model)
    dense = model.blocks.dense
    _stack_check(bn.mean[...], bn.var[...], bn.count[...], old_mean, old_var, xs,
                 np.asarray(dense.kernel[...], np.float64), np.asarray(dense.bias[...], np.float64))


class _VmappedLinen(nn.Module):
    variable_axes: dict

    @nn.compact
    def __call__(self, x):
        layer = nn.vmap(jaxbn.linen.BatchNorm, variable_axes=self.variable_axes, split_rngs={"params": True},
                        in_axes=0, out_axes=0)
        return layer(use_running_average=False, momentum=0.9)(x)


def test_linen_lifted_transform_without_the_moments_collection_raises():
    """Inside nn.vmap without MOMENTS in variable_axes a layer cannot pool: it says so instead of updating
    batch_stats on every micro-batch; with the collection each copy commits its own whole-batch moments."""
    xs = [ref.normal(i, (2, n, 3)) + i for i, n in enumerate(SIZES)]  # (copies, entries, features)
    lacking = _VmappedLinen({"params": 0, "batch_stats": 0})
    v = lacking.init(jax.random.key(0), xs[0])
    for mutable in ([jaxbn.linen.MOMENTS], [jaxbn.linen.MOMENTS, "batch_stats"]):
        with pytest.raises(ValueError, match=r"VmapBatchNorm_0.*must list the collection 'batch_moments' in "
                                             r"variable_axes, e.g. variable_axes=\{True: 0\}"):
            lacking.apply(v, xs[0], mutable=mutable)
    model = _VmappedLinen({True: 0})
    pools = {}
    for x in xs:
        _, upd = model.apply({**v, jaxbn.linen.MOMENTS: pools}, x, mutable=[jaxbn.linen.MOMENTS])
        pools = upd[jaxbn.linen.MOMENTS]
    bs, _ = jaxbn.linen.commit_moments(v["batch_stats"], pools)
    for copy in range(2):
        want = ref.update(0.0, 1.0, 0, *ref.moments(np.concatenate([x[copy] for x in xs])), momentum=0.9)
        np.testing.assert_allclose(bs["VmapBatchNorm_0"]["mean"][copy], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bs["VmapBatchNorm_0"]["var"][copy], want[1], rtol=1e-5)


def test_ghost_batches_commit_the_whole_batch_moments():
    """With virtual_batch_size, accumulation commits the moments of the step's whole batch (the spread
    between ghost batches included), not the average of the ghost batches' moments that one training call on
    the whole batch stores; the two differ."""
    rng = np.random.default_rng(8)
    xs = [(rng.normal(size=(n, 2)) + 3.0 * rng.normal(size=(n // 2, 1, 2)).repeat(2, 0).reshape(n, 2))
          .astype(np.float32) for n in (4, 6, 2)]  # ghost batches of 2 with far-apart means
    every = np.concatenate(xs)
    pooled = ref.update(0.0, 1.0, 0, *ref.moments(every), momentum=0.9)
    one_call = ref.ghost_stats(every, 2, momentum=0.9)
    assert np.all(pooled[1] > one_call[1] + 0.1)

    bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9, virtual_batch_size=2)
    v = bn.init(jax.random.key(0), xs[0])
    pools = {}
    for x in xs:
        _, upd = bn.apply({**v, jaxbn.linen.MOMENTS: pools}, x, mutable=[jaxbn.linen.MOMENTS])
        pools = upd[jaxbn.linen.MOMENTS]
    _, whole = bn.apply(v, every, mutable=["batch_stats"])
    layer = jaxbn.nnx.BatchNorm(2, momentum=0.9, virtual_batch_size=2, rngs=nnx.Rngs(0))
    jaxbn.nnx.accumulate(layer)
    for x in xs:
        layer(x)
    jaxbn.nnx.commit_moments(layer)
    plain = jaxbn.nnx.BatchNorm(2, momentum=0.9, virtual_batch_size=2, rngs=nnx.Rngs(0))
    plain(every)
    for got, want in ((jaxbn.linen.commit_moments(v["batch_stats"], pools)[0], pooled),
                      (whole["batch_stats"], one_call),
                      ({"mean": layer.mean[...], "var": layer.var[...]}, pooled),
                      ({"mean": plain.mean[...], "var": plain.var[...]}, one_call)):
        np.testing.assert_allclose(got["mean"], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["var"], want[1], rtol=1e-5)


# ---------------------------------------------------------------- Equinox and Haiku


class EqxNet(eqx.Module):
    l1: eqx.nn.Linear
    bn1: jaxbn.equinox.BatchNorm
    l2: eqx.nn.Linear
    bn2: jaxbn.equinox.BatchNorm

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(2, 3, key=k1)
        self.bn1 = jaxbn.equinox.BatchNorm(3, "batch", momentum=0.9, mode="batch")
        self.l2 = eqx.nn.Linear(3, 2, key=k2)
        self.bn2 = jaxbn.equinox.BatchNorm(2, "batch", momentum=0.8, mode="ema")

    def __call__(self, x, mask, state):
        h, state = self.bn1(self.l1(x), state, mask=mask)
        return self.bn2(self.l2(jax.nn.relu(h)), state, mask=mask)


def _eqx_forward(model, state, x, m):
    return jax.vmap(model, axis_name="batch", in_axes=(0, 0, None), out_axes=(0, None))(x, m, state)


def _eqx_setup():
    xs, masks = _micro_batches()
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    roles = tuple(np.asarray(a, np.float64) for a in (model.l1.weight.T, model.l1.bias, model.bn1.weight,
                                                     model.bn1.bias, model.l2.weight.T, model.l2.bias))
    return model, state, xs, masks, roles


def _eqx_check(model, state, xs, masks, roles):
    plain = jaxbn.equinox.accumulate(model, state, enable=False)
    h1, h2 = _hand(xs, masks, *roles)
    m = np.concatenate(masks)
    mean1, var1, n1 = ref.moments(h1, mask=m)
    want1 = ref.update(0.0, 1.0, 0, mean1, var1, n1, momentum=0.9)
    got1 = plain.get(model.bn1.batch_state_index)
    np.testing.assert_allclose(got1[0], want1[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got1[1], want1[1], rtol=1e-5)
    assert int(plain.get(model.bn1.batch_counter)) == 1
    mean2, var2, _ = ref.moments(h2, mask=m)  # "ema" mode's first step takes the batch moments as they are
    got2 = plain.get(model.bn2.ema_state_index)
    np.testing.assert_allclose(got2[0], mean2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got2[1], var2, rtol=1e-5)
    assert not bool(plain.get(model.bn2.ema_first_time_index))


def test_equinox_scan_and_multisteps():
    model, state, xs, masks, roles = _eqx_setup()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt = optax.MultiSteps(optax.sgd(0.0), every_k_schedule=K)

    @eqx.filter_jit
    def train_step(params, state, opt_state, x, m):
        def loss(params):
            y, state_ = _eqx_forward(eqx.combine(params, static), state, x, m)
            return jnp.sum(y**2), state_

        grads, state = jax.grad(loss, has_aux=True)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's MultiSteps divides floats by an int32
            updates, opt_state = opt.update(grads, opt_state, params)
        state = jaxbn.equinox.commit_moments(model, state, apply=opt.has_updated(opt_state))
        return optax.apply_updates(params, updates), state, opt_state

    acc = jaxbn.equinox.accumulate(model, state)
    opt_state = opt.init(params)
    for i, (x, m) in enumerate(zip(xs, masks, strict=True)):
        params, acc, opt_state = train_step(params, acc, opt_state, x, m[:, 0])
        if i < K - 1:
            np.testing.assert_array_equal(acc.get(model.bn1.batch_state_index).stats[0], 0.0)
    _eqx_check(model, acc, xs, masks, roles)

    x = np.concatenate(xs)[:15].reshape(3, 5, 2)
    m = np.concatenate(masks)[:15].reshape(3, 5, 1)

    @eqx.filter_jit
    def run(state, x, m):
        state, _ = jax.lax.scan(lambda s, xm: (_eqx_forward(model, s, xm[0], xm[1][:, 0])[1], None), state, (x, m))
        return jaxbn.equinox.commit_moments(model, state)

    _eqx_check(model, run(jaxbn.equinox.accumulate(model, state), x, m), list(x), list(m), roles)


def _hk_net(x, mask, is_training):
    x = hk.Linear(3)(x)
    x = jax.nn.relu(jaxbn.haiku.BatchNorm(True, True, 0.9)(x, is_training, mask=mask))
    x = hk.Linear(2)(x)
    return jaxbn.haiku.BatchNorm(True, True, 0.8)(x, is_training, mask=mask)


def test_haiku_scan_and_multisteps():
    xs, masks = _micro_batches()
    f = hk.transform_with_state(_hk_net)
    x0 = ref.normal(9, (4, 2))
    params, state0 = f.init(jax.random.key(0), x0, None, True)
    _, state0 = f.apply(params, state0, None, x0, None, True)  # one ordinary step first: the decay then shows
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    roles = (p["linear"]["w"], p["linear"]["b"], p["batch_norm"]["scale"][0], p["batch_norm"]["offset"][0],
             p["linear_1"]["w"], p["linear_1"]["b"])

    def check(state, xs, masks):
        h1, h2 = _hand(xs, masks, *roles)
        m = np.concatenate(masks)
        for name, h, decay in (("batch_norm", h1, 0.9), ("batch_norm_1", h2, 0.8)):
            mean, var, _ = ref.moments(h, mask=m)
            for suffix, value in (("mean_ema", mean), ("var_ema", var)):
                old = state0[f"{name}/~/{suffix}"]
                hidden = decay * np.asarray(old["hidden"], np.float64)[0] + (1 - decay) * value
                new = state[f"{name}/~/{suffix}"]
                assert int(new["counter"]) == int(old["counter"]) + 1 == 2
                np.testing.assert_allclose(new["hidden"][0], hidden, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(new["average"][0], hidden / (1 - decay**2), rtol=1e-5, atol=1e-6)

    opt = optax.MultiSteps(optax.sgd(0.0), every_k_schedule=K)

    @jax.jit
    def train_step(params, state, opt_state, x, m):
        def loss(params):
            y, state_ = f.apply(params, state, None, x, m, True)
            return jnp.sum(y**2), state_

        grads, state = jax.grad(loss, has_aux=True)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's MultiSteps divides floats by an int32
            updates, opt_state = opt.update(grads, opt_state, params)
        state = jaxbn.haiku.commit_moments(state, apply=opt.has_updated(opt_state))
        return optax.apply_updates(params, updates), state, opt_state

    acc, opt_state, prm = jaxbn.haiku.accumulate(state0), opt.init(params), params
    for i, (x, m) in enumerate(zip(xs, masks, strict=True)):
        prm, acc, opt_state = train_step(prm, acc, opt_state, x, m)
        if i < K - 1:
            np.testing.assert_array_equal(acc["batch_norm/~/mean_ema"]["average"],
                                          state0["batch_norm/~/mean_ema"]["average"])
    check(jaxbn.haiku.accumulate(acc, enable=False), xs, masks)
    assert set(jaxbn.haiku.accumulate(acc, enable=False)) == set(state0)

    x = np.concatenate(xs)[:15].reshape(3, 5, 2)
    m = np.concatenate(masks)[:15].reshape(3, 5, 1)

    @jax.jit
    def run(state, x, m):
        state, _ = jax.lax.scan(lambda s, xm: (f.apply(params, s, None, xm[0], xm[1], True)[1], None), state, (x, m))
        return jaxbn.haiku.commit_moments(state)

    check(run(jaxbn.haiku.accumulate(state0), x, m), list(x), list(m))


def test_equinox_haiku_errors():
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    with pytest.raises(ValueError, match=r"pass the state returned by jaxbn.equinox.accumulate\(model, state\)"):
        jaxbn.equinox.commit_moments(model, state)
    with pytest.raises(ValueError, match="has no jaxbn.equinox.BatchNorm layer to accumulate"):
        jaxbn.equinox.accumulate(eqx.nn.Linear(2, 2, key=jax.random.key(0)), state)
    with pytest.raises(ValueError, match="apply must be a bool"):
        jaxbn.equinox.commit_moments(model, jaxbn.equinox.accumulate(model, state), apply=1)
    f = hk.transform_with_state(_hk_net)
    _, hk_state = f.init(jax.random.key(0), np.ones((4, 2), np.float32), None, True)
    with pytest.raises(ValueError, match=r"pass jaxbn.haiku.accumulate\(state\)"):
        jaxbn.haiku.commit_moments(hk_state)
    with pytest.raises(ValueError, match="the state has no batch norm to accumulate"):
        jaxbn.haiku.accumulate({})


def test_inference_layers_neither_pool_nor_change():
    """Accumulation is for training calls: a layer in inference (frozen, use_running_average=True) normalizes
    with its running statistics and pools nothing, in every module."""
    x = ref.normal(11, (6, 2)) + 3.0
    stats_mean, stats_var = np.zeros(2), np.ones(2)
    want = ref.normalize(x, stats_mean, stats_var)

    bn = jaxbn.linen.BatchNorm(use_running_average=True)
    v = bn.init(jax.random.key(0), x)
    y, upd = bn.apply(v, x, mutable=[jaxbn.linen.MOMENTS])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert not upd.get(jaxbn.linen.MOMENTS)

    layer = jaxbn.nnx.BatchNorm(2, use_running_average=True, rngs=nnx.Rngs(0))
    jaxbn.nnx.accumulate(layer)
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.pooled_count[...], 0.0)

    ebn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(2, "batch", mode="batch", inference=True)
    acc = jaxbn.equinox.accumulate(ebn, state)
    y, acc = jax.vmap(ebn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, acc)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(acc.get(ebn.batch_state_index).pooled.count, 0.0)

    f = hk.transform_with_state(lambda x, t: jaxbn.haiku.BatchNorm(False, False, 0.9)(x, t))
    params, hk_state = f.init(None, x, True)
    acc = jaxbn.haiku.accumulate(hk_state)
    _, acc = f.apply(params, acc, None, x, False)
    np.testing.assert_array_equal(acc["batch_norm"]["pooled_count"], 0.0)


def _hk_ema(hidden, counter, value, decay):
    """haiku's zero-debiased EMA step from its definition, float64: (hidden, counter, average)."""
    hidden = decay * np.asarray(hidden, np.float64) + (1 - decay) * value
    return hidden, counter + 1, hidden / (1 - decay ** (counter + 1))


def test_haiku_x64_commit_is_exact_to_float64():
    """Under jax x64 a float64 layer's pool keeps its decay in float64: the committed averages are haiku's EMA
    of the whole batch's moments to float64 rounding (a float32 decay put them 1e-8 off)."""
    xs, masks = _micro_batches()
    with jax.enable_x64(True):
        f = hk.transform_with_state(lambda x, m: jaxbn.haiku.BatchNorm(False, False, 0.9)(x, True, mask=m))
        x0 = ref.normal(9, (4, 2)).astype(np.float64)
        params, state0 = f.init(None, x0, None)
        _, state0 = f.apply(params, state0, None, x0, None)  # counter 1: the decay shows
        acc = jaxbn.haiku.accumulate(state0)
        for x, m in zip(xs, masks, strict=True):
            _, acc = f.apply(params, acc, None, x.astype(np.float64), m)
        out = jaxbn.haiku.commit_moments(acc)
    mean, var, _ = ref.moments(np.concatenate(xs), mask=np.concatenate(masks))
    for suffix, value in (("mean_ema", mean), ("var_ema", var)):
        old, new = state0[f"batch_norm/~/{suffix}"], out[f"batch_norm/~/{suffix}"]
        hidden, counter, average = _hk_ema(old["hidden"][0], int(old["counter"]), value, 0.9)
        assert new["average"].dtype == jnp.float64 and int(new["counter"]) == counter == 2
        np.testing.assert_allclose(new["hidden"][0], hidden, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(new["average"][0], average, rtol=1e-12, atol=1e-14)


def _hk_stacked(x, is_training):
    def block(x):
        return jaxbn.haiku.BatchNorm(True, True, 0.9)(hk.Linear(2)(x), is_training)

    return hk.layer_stack(2)(block)(x)


def _hk_stack_inputs(xs, p):
    """Each stacked layer's input over the micro-batches (float64): layer l takes x @ w[l] + b[l], x the previous
    layer's output normalized with its micro-batch's moments, scale[l] and offset[l]."""
    p = {k.rsplit("/", 1)[-1]: v for k, v in p.items()}  # hk.layer_stack prefixes the module names
    w, b = p["linear"]["w"], p["linear"]["b"]
    scale, offset = p["batch_norm"]["scale"][:, 0], p["batch_norm"]["offset"][:, 0]
    hs, inputs = [np.asarray(x, np.float64) for x in xs], []
    for layer in range(2):
        zs = [h @ w[layer] + b[layer] for h in hs]
        inputs.append(np.concatenate(zs))
        hs = [ref.normalize(z, *ref.moments(z)[:2], scale[layer], offset[layer]) for z in zs]
    return inputs


def test_haiku_layer_stack_accumulates_each_layer():
    """Under hk.layer_stack each stacked layer pools its own input (one decay per layer) and commits one EMA
    update from the whole batch's moments."""
    xs, _ = _micro_batches()
    f = hk.transform_with_state(_hk_stacked)
    params, state0 = f.init(jax.random.key(0), xs[0], True)
    params = jax.tree.map(lambda a: a + 0.5 * ref.normal(int(a.size), a.shape), params)
    _, state0 = f.apply(params, state0, None, xs[0], True)  # counter 1: the decay shows
    name = next(k for k in state0 if k.endswith("/~/mean_ema"))[: -len("/~/mean_ema")]
    acc = jaxbn.haiku.accumulate(state0)
    step = jax.jit(lambda acc, x: f.apply(params, acc, None, x, True)[1])
    for x in xs:
        acc = step(acc, x)
    out = jaxbn.haiku.accumulate(jaxbn.haiku.commit_moments(acc), enable=False)
    assert jax.tree.structure(out) == jax.tree.structure(state0)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    for layer, h in enumerate(_hk_stack_inputs(xs, p)):
        mean, var, _ = ref.moments(h)
        for suffix, value in (("mean_ema", mean), ("var_ema", var)):
            old, new = state0[f"{name}/~/{suffix}"], out[f"{name}/~/{suffix}"]
            hidden, counter, average = _hk_ema(old["hidden"][layer, 0], int(old["counter"][layer]), value, 0.9)
            assert int(new["counter"][layer]) == counter
            np.testing.assert_allclose(new["hidden"][layer, 0], hidden, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(new["average"][layer, 0], average, rtol=1e-5, atol=1e-5)


def test_haiku_accumulation_leaves_haikus_own_batch_norm_alone():
    """A model with haiku's own hk.BatchNorm too: it keeps haiku's update on every micro-batch (its unused pool
    changes nothing and goes with enable=False); jaxbn's layer commits once from the whole batch."""
    def net(x, is_training):
        x = hk.BatchNorm(False, False, 0.9, name="theirs")(x, is_training)
        return jaxbn.haiku.BatchNorm(False, False, 0.8, name="ours")(2.0 * x + 1.0, is_training)

    xs, _ = _micro_batches()
    f = hk.transform_with_state(net)
    with jax.numpy_dtype_promotion("standard"):  # haiku's own layer mixes int32 and float32
        params, state0 = f.init(None, xs[0], True)
        acc = jaxbn.haiku.accumulate(state0)
        for x in xs:
            acc = jax.jit(lambda acc, x: f.apply(params, acc, None, x, True)[1])(acc, x)
    out = jaxbn.haiku.accumulate(jaxbn.haiku.commit_moments(acc), enable=False)
    assert jax.tree.structure(out) == jax.tree.structure(state0)
    theirs = {s: (np.asarray(state0[f"theirs/~/{s}"]["hidden"][0], np.float64), 0) for s in ("mean_ema", "var_ema")}
    for x in xs:
        mean, var, _ = ref.moments(x)
        for suffix, value in (("mean_ema", mean), ("var_ema", var)):
            theirs[suffix] = _hk_ema(*theirs[suffix], value, 0.9)[:2]
    h = np.concatenate([2.0 * ref.normalize(x, *ref.moments(x)[:2], eps=1e-5) + 1.0 for x in xs])
    mean, var, _ = ref.moments(h)
    for suffix, value in (("mean_ema", mean), ("var_ema", var)):
        hidden, counter = theirs[suffix]
        got = out[f"theirs/~/{suffix}"]
        assert int(got["counter"]) == counter == len(xs)
        np.testing.assert_allclose(got["average"][0], hidden / (1 - 0.9**counter), rtol=1e-5, atol=1e-5)
        old = state0[f"ours/~/{suffix}"]
        hidden, counter, average = _hk_ema(old["hidden"][0], int(old["counter"]), value, 0.8)
        assert int(out[f"ours/~/{suffix}"]["counter"]) == counter
        np.testing.assert_allclose(out[f"ours/~/{suffix}"]["average"][0], average, rtol=1e-5, atol=1e-5)
