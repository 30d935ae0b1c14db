"""jaxbn.fold and fold_linen: the folded layer equals the layer followed by an inference-mode batch norm."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn.interop import fold_linen
from tests import reference as ref


def _bn_params(c, seed, *, use_scale=True, use_bn_bias=True, fshape=None):
    rng = np.random.default_rng(seed)
    shape = (c,) if fshape is None else fshape
    mean = rng.normal(size=shape).astype(np.float32) * 2
    var = rng.uniform(0.05, 3.0, size=shape).astype(np.float32)
    scale = rng.normal(size=shape).astype(np.float32) if use_scale else None
    bn_bias = rng.normal(size=shape).astype(np.float32) if use_bn_bias else None
    return jaxbn.RunningStats(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(5)), scale, bn_bias


def _expected(z, stats, scale, bn_bias, eps=1e-5):
    """float64 reference: batch norm in inference mode on the unfolded layer's output."""
    return ref.normalize(np.asarray(z, np.float64), stats.mean, stats.var, scale, bn_bias, axis=-1, eps=eps)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("use_scale", [False, True])
@pytest.mark.parametrize("use_bn_bias", [False, True])
def test_dense(maybe_jit, use_bias, use_scale, use_bn_bias):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5))
    kernel = rng.normal(size=(5, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32) if use_bias else None
    stats, scale, bn_bias = _bn_params(4, 1, use_scale=use_scale, use_bn_bias=use_bn_bias)
    k, b = maybe_jit(lambda *a: jaxbn.fold(*a, epsilon=1e-3))(kernel, bias, stats, scale, bn_bias)
    assert k.shape == kernel.shape and k.dtype == jnp.float32
    assert b.shape == (4,) and b.dtype == jnp.float32
    y = nn.Dense(4).apply({"params": {"kernel": k, "bias": b}}, jnp.asarray(x, jnp.float32))
    z = x @ kernel + (0 if bias is None else bias)
    np.testing.assert_allclose(y, _expected(z, stats, scale, bn_bias, 1e-3), rtol=1e-4, atol=1e-4)


CONVS = [
    # (input shape NHWC, features, kernel_size, strides, padding, feature_group_count)
    ((2, 9, 9, 4), 6, (3, 3), 1, "SAME", 1),
    ((2, 9, 9, 4), 6, (3, 3), 2, "VALID", 1),
    ((2, 10, 10, 4), 6, (3, 2), (2, 1), "SAME", 2),
    ((2, 8, 8, 6), 6, (3, 3), 1, "VALID", 3),
    ((2, 8, 8, 4), 4, (3, 3), 2, "SAME", 4),  # depthwise
    ((2, 8, 8, 4), 8, (5, 5), 1, "SAME", 4),  # depthwise, channel multiplier 2
    ((3, 12, 4), 5, (3,), 1, "SAME", 1),  # 1-D
    ((1, 5, 5, 5, 2), 4, (2, 2, 2), 2, "VALID", 2),  # 3-D, grouped
]


@pytest.mark.parametrize("shape, features, window, strides, padding, groups", CONVS)
@pytest.mark.parametrize("use_bias", [False, True])
def test_conv(shape, features, window, strides, padding, groups, use_bias):
    kw = dict(strides=strides, padding=padding, feature_group_count=groups)
    rng = np.random.default_rng(2)
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(*window, shape[-1] // groups, features)).astype(np.float32)
    bias = rng.normal(size=features).astype(np.float32) if use_bias else None
    stats, scale, bn_bias = _bn_params(features, 4)

    @jax.jit  # one compilation per case: the test stays fast
    def run(x, kernel, bias, stats, scale, bn_bias):
        params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
        z = nn.Conv(features, window, use_bias=bias is not None, **kw).apply({"params": params}, x)
        k, b = jaxbn.fold(kernel, bias, stats, scale, bn_bias)
        y = nn.Conv(features, window, **kw).apply({"params": {"kernel": k, "bias": b}}, x)
        y_bn, _ = jaxbn.batch_norm(z, stats, scale, bn_bias, training=False)
        return z, y, y_bn

    z, y, y_bn = run(x, kernel, bias, stats, scale, bn_bias)
    expected = _expected(z, stats, scale, bn_bias)
    atol = 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(y_bn, expected, rtol=1e-4, atol=atol)  # jaxbn's unfolded path: float64 too


def test_dense_general_multi_axis_features():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(7, 3)), jnp.float32)
    layer = nn.DenseGeneral((2, 4))
    rng = np.random.default_rng(6)
    params = {"kernel": jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32), "bias": jnp.ones((2, 4))}
    stats, scale, bn_bias = _bn_params(None, 6, fshape=(2, 4))
    z = layer.apply({"params": params}, x)
    k, b = jaxbn.fold(params["kernel"], params["bias"], stats, scale, bn_bias)
    y = layer.apply({"params": {"kernel": k, "bias": b}}, x)
    # float64: the layer z = x . kernel + bias, then (z - mean) / sqrt(var + eps) * scale + bias per (2, 4) feature
    z64 = np.einsum("ni,ijk->njk", np.asarray(x, np.float64), np.asarray(params["kernel"], np.float64)) + 1.0
    want = ref.normalize(z64, stats.mean, stats.var, scale, bn_bias, axis=(-2, -1))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(z, np.float64), z64, rtol=1e-5, atol=1e-5)


def test_flax_batch_stats_mapping_is_accepted():
    stats, scale, bn_bias = _bn_params(3, 7)
    kernel = jnp.ones((2, 3))
    a = jaxbn.fold(kernel, None, stats, scale, bn_bias)
    b = jaxbn.fold(kernel, None, {"mean": stats.mean, "var": stats.var}, scale, bn_bias)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_keeps_kernel_dtype_and_computes_in_float32():
    rng = np.random.default_rng(8)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.bfloat16)
    stats, scale, bn_bias = _bn_params(4, 9)
    stats = jaxbn.RunningStats(stats.mean, stats.var * 1e-3, stats.count)  # large multipliers
    k, b = jaxbn.fold(kernel, None, stats, jnp.asarray(scale, jnp.bfloat16), bn_bias)
    assert k.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16
    mul = np.asarray(jnp.asarray(scale, jnp.bfloat16), np.float32) / np.sqrt(np.asarray(stats.var) + 1e-5)
    want = (np.asarray(kernel, np.float32) * mul).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(want))
    # a float32 bias keeps float32
    _, b32 = jaxbn.fold(kernel, jnp.zeros(4, jnp.float32), stats)
    assert b32.dtype == jnp.float32


def test_complex_running_mean_gives_complex_bias():
    stats = jaxbn.RunningStats(jnp.array([1.0 + 1.0j, 0.0]), jnp.array([1.0, 4.0]), jnp.array(1))
    k, b = jaxbn.fold(jnp.ones((2, 2)), None, stats, epsilon=1e-6)
    assert k.dtype == jnp.float32 and b.dtype == jnp.complex64
    np.testing.assert_allclose(b, [-1.0 - 1.0j, 0.0], atol=1e-5)


STATS4 = jaxbn.init_stats(4)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: jaxbn.fold(jnp.ones((3, 5)), None, STATS4),
            r"stats\.mean has shape \(4,\) but the kernel of shape \(3, 5\) has \(5,\) output features on its last ax",
        ),
        (lambda: jaxbn.fold(jnp.ones((3, 3, 2, 5)), None, STATS4), r"kernel of shape \(3, 3, 2, 5\) has \(5,\)"),
        (
            lambda: jaxbn.fold(jnp.ones((3, 4)), None, STATS4, scale=jnp.ones(3)),
            r"scale has shape \(3,\) but the kernel of shape \(3, 4\) has \(4,\) output features",
        ),
        (
            lambda: jaxbn.fold(jnp.ones((3, 4)), None, STATS4, bn_bias=jnp.ones((1, 4))),
            r"bn_bias has shape \(1, 4\) but the kernel of shape \(3, 4\)",
        ),
        (lambda: jaxbn.fold(jnp.ones((3, 4)), jnp.ones(5), STATS4), r"bias has shape \(5,\) but the kernel"),
        (
            lambda: jaxbn.fold(jnp.ones((3, 4)), None, jaxbn.RunningStats(jnp.zeros(4), jnp.ones(2), jnp.array(0))),
            r"stats\.var has shape \(2,\) but the kernel of shape \(3, 4\)",
        ),
        (lambda: jaxbn.fold(jnp.ones(4), None, STATS4), r"kernel of shape \(4,\) has no input axis"),
        (
            lambda: jaxbn.fold(jnp.ones((3, 4)), None, jaxbn.RunningStats(jnp.zeros(()), jnp.ones(()), 0)),
            r"stats\.mean is a scalar",
        ),
        (lambda: jaxbn.fold(jnp.ones((3, 4)), None, STATS4, epsilon=0.0), r"epsilon must be > 0"),
    ],
)
def test_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: jaxbn.fold(jnp.ones((3, 4), jnp.int32), None, STATS4),
            r"kernel must be a floating-point array, got dtype int32",
        ),
        (lambda: jaxbn.fold(jnp.ones((3, 4)), None, jnp.zeros(4)), r"stats must be a jaxbn\.RunningStats"),
        (lambda: jaxbn.fold(jnp.ones((3, 4)), None, {"mean": jnp.zeros(4)}), r"mapping with keys \['mean'\]"),
        (
            lambda: jaxbn.fold(jnp.ones((3, 4)), None, STATS4, scale=jnp.ones(4, jnp.int32)),
            r"scale must be a floating-point array",
        ),
        (
            lambda: jaxbn.fold(jnp.ones((3, 4)), None, jaxbn.RunningStats(jnp.zeros(4), jnp.ones(4, complex), 0)),
            r"stats\.var must be real",
        ),
    ],
)
def test_type_errors(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_top_level_export():
    assert jaxbn.fold is jaxbn._fold.fold
    assert jaxbn.interop.fold_linen is fold_linen


# --- whole Linen models -------------------------------------------------------------------------------


def _norm_classes():
    import jaxbn.linen  # part of the package: this variant always runs

    return [
        ("flax", lambda **kw: nn.BatchNorm(use_fast_variance=False, **kw)),
        ("jaxbn.linen", lambda **kw: jaxbn.linen.BatchNorm(**kw)),
        ("jaxbn.linen-cumulative", lambda **kw: jaxbn.linen.BatchNorm(momentum=None, **kw)),  # stores a count
    ]


class Block(nn.Module):
    norm: object = None

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), feature_group_count=2, use_bias=self.norm is None)(x)
        if self.norm is not None:
            x = self.norm(use_running_average=True)(x)
        return nn.relu(x)


class Net(nn.Module):
    norm: object = None

    @nn.compact
    def __call__(self, x):
        bn = self.norm is not None
        x = nn.Conv(4, (3, 3), strides=2, use_bias=not bn)(x)
        if bn:
            x = self.norm(use_running_average=True)(x)
        x = nn.relu(x)
        x = Block(self.norm)(x)
        x = x.mean(axis=(1, 2))
        x = nn.Dense(3)(x)  # has a bias of its own
        if bn:
            x = self.norm(use_running_average=True, use_scale=False)(x)
        return x


PAIRS = [("Conv_0", "BatchNorm_0"), ("Block_0/Conv_0", ("Block_0", "BatchNorm_0")), (("Dense_0",), "BatchNorm_1")]


def _randomize(variables, seed):
    """Random kernels, non-trivial running statistics and BN affine parameters (from shapes alone)."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten_with_path(variables)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if "'var'" in name:
            out.append(jnp.asarray(rng.uniform(0.2, 3.0, leaf.shape), leaf.dtype))
        elif "BatchNorm" in name or "'bias'" in name:
            out.append(jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype))
        else:
            out.append(jnp.asarray(rng.normal(size=leaf.shape) * 0.5, leaf.dtype))
    return jax.tree.unflatten(tree, out)


@pytest.mark.parametrize("name, norm", _norm_classes(), ids=[n for n, _ in _norm_classes()])
def test_fold_linen_model(name, norm):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 12, 3)), jnp.float32)
    model = Net(norm)
    variables = _randomize(jax.eval_shape(model.init, jax.random.key(0), x), 1)
    before = jax.tree.map(np.array, variables)
    folded = fold_linen(variables, PAIRS)
    assert set(folded) == {"params"}, "batch_stats emptied and dropped"
    plain = Net(None)
    want_shapes = jax.tree.map(jnp.shape, jax.eval_shape(plain.init, jax.random.key(0), x))
    assert jax.tree.map(jnp.shape, folded) == want_shapes
    y = jax.jit(plain.apply)(folded, x)
    np.testing.assert_allclose(y, jax.jit(model.apply)(variables, x), rtol=1e-4, atol=1e-4)
    jax.tree.map(np.testing.assert_array_equal, variables, before)  # input untouched


def test_fold_linen_keeps_other_entries():
    x = jnp.ones((2, 6, 6, 3))
    norm = _norm_classes()[0][1]
    variables = dict(_randomize(jax.eval_shape(Net(norm).init, jax.random.key(0), x), 2))
    variables["extra"] = {"keep": jnp.ones(2)}
    folded = fold_linen(variables, PAIRS[:1])  # fold only the first pair
    assert "BatchNorm_0" not in folded["params"] and "BatchNorm_0" not in folded["batch_stats"]
    assert "BatchNorm_1" in folded["params"] and "BatchNorm_0" in folded["batch_stats"]["Block_0"]
    assert folded["extra"]["keep"].shape == (2,)
    frozen = fold_linen(flax.core.freeze(variables), PAIRS)  # FrozenDicts in, plain dicts out
    assert type(frozen) is dict and type(frozen["params"]["Block_0"]) is dict
    assert "batch_stats" not in frozen


def test_fold_linen_errors():
    x = jnp.ones((2, 6, 6, 3))
    variables = _randomize(jax.eval_shape(Net(_norm_classes()[0][1]).init, jax.random.key(0), x), 3)
    with pytest.raises(KeyError, match=r"'Conv_9' is not in variables\['params'\].*found \["):
        fold_linen(variables, [("Conv_9", "BatchNorm_0")])
    with pytest.raises(KeyError, match=r"'Block_0/BatchNorm_7' is not in variables\['batch_stats'\]"):
        fold_linen(variables, [("Block_0/Conv_0", "Block_0/BatchNorm_7")])
    with pytest.raises(ValueError, match=r"'BatchNorm_0' appears in more than one pair"):
        fold_linen(variables, [("Conv_0", "BatchNorm_0"), ("Block_0/Conv_0", "BatchNorm_0")])
    with pytest.raises(ValueError, match=r"layer 'BatchNorm_0' has no 'kernel' param"):
        fold_linen(variables, [("BatchNorm_0", "BatchNorm_1")])
    with pytest.raises(ValueError, match=r"folding 'BatchNorm_1' into 'Conv_0': stats\.mean has shape \(3,\)"):
        fold_linen(variables, [("Conv_0", "BatchNorm_1")])
    with pytest.raises(TypeError, match=r"each pair must be"):
        fold_linen(variables, ["Conv_0"])
    with pytest.raises(TypeError, match=r"'params' collection"):
        fold_linen({"batch_stats": {}}, [])
