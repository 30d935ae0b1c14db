"""Every documented bad input raises a clear error at trace time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from tests import reference as ref

X = jnp.ones((8, 4))
S = jaxbn.init_stats(4)


def _bn(**kw):
    args = dict(training=True)
    args.update(kw)
    x = args.pop("x", X)
    stats = args.pop("stats", S)
    return jaxbn.batch_norm(x, stats, **args)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: _bn(stats=jaxbn.init_stats(5)),
            r"stats\.mean has shape \(5,\).*feature shape \(4,\).*init_stats\(4\)",
        ),
        (lambda: _bn(scale=jnp.ones(3)), r"scale has shape \(3,\) but x of shape \(8, 4\)"),
        (lambda: _bn(bias=jnp.ones((2, 2))), r"bias has shape \(2, 2\)"),
        (lambda: _bn(axis=2), r"axis=2 is out of range for an input with 2 dimensions"),
        (lambda: _bn(axis=(0, 0)), r"names the same axis twice"),
        (lambda: _bn(mask=jnp.ones((3, 4), bool)), r"mask of shape \(3, 4\) does not broadcast to x of shape \(8, 4\)"),
        (lambda: _bn(momentum=1.5), r"momentum=1.5 is outside \[0, 1\]"),
        (lambda: _bn(momentum=-0.1), r"momentum=-0.1 is outside \[0, 1\]"),
        (lambda: _bn(epsilon=0.0), r"epsilon must be > 0"),
        (lambda: _bn(x=jnp.ones((1, 4)), stats=S), r"more than one value per feature.*shape \(1, 4\)"),
        (lambda: jaxbn.batch_renorm(X, S, training=True, r_max=0.5), r"r_max must be >= 1"),
        (lambda: jaxbn.batch_renorm(X, S, training=True, d_max=-1.0), r"d_max must be >= 0"),
        (lambda: jaxbn.moments(X, axis=-3), r"axis=-3 is out of range"),
        (lambda: jaxbn.moments(X, mask=jnp.ones((2,), bool)), r"mask of shape \(2,\) does not broadcast"),
        (lambda: jaxbn.normalize(X, jnp.zeros(4), jnp.ones(4), epsilon=-1.0), r"epsilon must be > 0"),
        (lambda: jaxbn.normalize(X, jnp.zeros(3), jnp.ones(4)), r"mean has shape \(3,\)"),
        (
            lambda: jaxbn.update_stats(S, jaxbn.moments(jnp.ones((3, 2)))),
            r"stats has feature shape \(4,\) but moments has \(2,\)",
        ),
        (lambda: jaxbn.update_stats(S, jaxbn.moments(X), momentum=2.0), r"momentum=2.0 is outside"),
        (lambda: jaxbn.init_stats(-1), r"feature_shape must be non-negative"),
        (lambda: _bn(epsilon=float("inf")), r"epsilon must be > 0 and finite, got inf"),
        (lambda: _bn(epsilon=float("nan")), r"epsilon must be > 0, got nan"),
        (lambda: jaxbn.normalize(X, jnp.zeros(4), jnp.ones(4), epsilon=np.inf), r"epsilon must be > 0 and finite"),
        (lambda: jaxbn.fold(jnp.ones((3, 4)), None, S, epsilon=float("inf")), r"epsilon must be > 0 and finite"),
        (lambda: _bn(x=jnp.ones((0, 4))), r"more than one value per feature.*shape \(0, 4\)"),
    ],
)
def test_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: _bn(x=jnp.ones((8, 4), jnp.int32)), r"x must be a floating-point or complex array, got dtype int32"),
        (lambda: jaxbn.moments(jnp.ones((8, 4), bool)), r"got dtype bool"),
        (lambda: _bn(mask=jnp.ones((8, 1), jnp.float32)), r"mask must be a boolean"),
        (lambda: _bn(axis=1.0), r"axis must be an int or a tuple of ints"),
        (lambda: _bn(stats={"mean": 0}), r"stats must be a jaxbn.RunningStats"),
        (lambda: jaxbn.batch_renorm(X.astype(jnp.complex64), S, training=True), r"batch_renorm takes real inputs"),
        # a Moments (or any other 3-tuple) is not running statistics
        (lambda: _bn(stats=jaxbn.moments(X)), r"stats must be a jaxbn.RunningStats .*got a jaxbn.Moments"),
        (lambda: _bn(stats=(jnp.zeros(4), jnp.ones(4), 0)), r"stats must be a jaxbn.RunningStats .*got tuple"),
        (lambda: jaxbn.batch_renorm(X, jaxbn.moments(X), training=True), r"got a jaxbn.Moments"),
        (lambda: jaxbn.update_stats(jaxbn.moments(X), jaxbn.moments(X)), r"got a jaxbn.Moments"),
        (lambda: jaxbn.update_stats(S, tuple(jaxbn.moments(X))), r"moments must be a jaxbn.Moments"),
        (lambda: jaxbn.fold(jnp.ones((3, 4)), None, jaxbn.moments(X)), r"got a jaxbn.Moments"),
        # a list axis_name: a TypeError that says to pass a tuple
        (lambda: _bn(axis_name=["a", "b"]), r"axis_name must be a name or a tuple of names, got the list"),
        (lambda: jaxbn.moments(X, axis_name=["a"]), r"pass axis_name=\('a',\)"),
        (lambda: jaxbn.init_stats(3, jnp.int32), r"dtype must be a real floating dtype .* got int32"),
        (lambda: jaxbn.init_stats(3, bool), r"dtype must be a real floating dtype .* got bool"),
        (lambda: jaxbn.init_stats(3, "no such dtype"), r"dtype must be a floating dtype"),
        (lambda: _bn(training=None), r"training must be True or False, got None"),
        (lambda: _bn(training="yes"), r"training must be True or False, got 'yes'"),
        (lambda: jaxbn.batch_renorm(X, S, training=None), r"training must be True or False, got None"),
        (lambda: jax.jit(lambda t: _bn(training=t))(True), r"training must be a Python bool, got a traced value"),
        (lambda: _bn(epsilon="1e-5"), r"epsilon must be a number > 0, got '1e-5'"),
    ],
)
def test_type_errors(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_errors_raise_at_trace_time():
    """The checks fire while tracing under jit, before anything runs."""
    with pytest.raises(ValueError, match="stats.mean has shape"):
        jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_stats(3), training=True)).lower(X)


def test_unbound_axis_name_says_how_to_bind_it():
    with pytest.raises(NameError, match=r"axis_name='batch'.*jax\.pmap.*jax\.vmap.*jax\.shard_map"):
        _bn(axis_name="batch")
    with pytest.raises(NameError, match=r"not bound"):
        jaxbn.moments(X, axis_name="devices")


def test_one_value_per_feature_is_fine_with_axis_name():
    x = np.random.default_rng(0).normal(size=(4, 1, 3)).astype(np.float32)
    y, _ = jax.vmap(lambda xb: jaxbn.batch_norm(xb, jaxbn.init_stats(3), training=True, axis_name="b"), axis_name="b")(
        x
    )
    xn = x[:, 0]
    np.testing.assert_allclose(y[:, 0], (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5), rtol=1e-4, atol=1e-5)


def test_mask_integer_is_accepted():
    """A 0/1 integer mask is the boolean mask: outputs and stats against float64 on the valid rows."""
    x = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32) * 2 + 1
    mask01 = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.int32)[:, None]
    y, new = _bn(x=x, mask=jnp.asarray(mask01), momentum=0.5)
    mean, var, n = ref.moments(x, -1, mask01.astype(bool))
    np.testing.assert_allclose(y, ref.normalize(x, mean, var), rtol=1e-4, atol=1e-5)
    want_mean, want_var, _ = ref.update(np.zeros(4), np.ones(4), 0, mean, var, n, momentum=0.5)
    np.testing.assert_allclose(new.mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, want_var, rtol=1e-5)


def test_numpy_integer_axis_is_accepted():
    """axis=np.int64(1) (e.g. from an array of axes) is the axis 1, not a TypeError."""
    x = np.random.default_rng(2).normal(size=(6, 4, 3)).astype(np.float32)
    for axis in (np.int64(1), (np.int32(1),), [np.int64(-2)]):
        y, new = jaxbn.batch_norm(x, jaxbn.init_stats(4), training=True, axis=axis, momentum=0.0)
        mean, var, _ = ref.moments(x, 1)
        np.testing.assert_allclose(y, ref.normalize(x, mean, var, axis=1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new.var, var, rtol=1e-5)
    assert jaxbn.init_stats(np.int64(3)).mean.shape == (3,)


def test_an_empty_batch_is_an_all_masked_batch():
    """N=0 behaves as a batch whose mask is all False: moments with count 0, and an update that is a
    no-op (count included). Training without axis_name refuses N=0 as it refuses N=1 (fewer than two
    values per feature, a ValueError above); with axis_name an empty shard contributes nothing."""
    empty = jaxbn.moments(jnp.ones((0, 4)))
    masked = jaxbn.moments(X, mask=jnp.zeros((8, 1), bool))
    for m in (empty, masked):
        np.testing.assert_array_equal(m.count, 0.0)
        assert np.all(np.isfinite(m.mean)) and np.all(np.isfinite(m.var))
        jax.tree.map(np.testing.assert_array_equal, jaxbn.update_stats(S, m, momentum=None), S)
    x = np.random.default_rng(3).normal(size=(2, 3, 4)).astype(np.float32)
    shards = [x[0], x[1, :0]]  # the second device holds no row
    ys, new = [], []
    for xb in shards:  # one device per call: an empty local batch under a bound axis contributes nothing
        y, s = jax.vmap(lambda xb: jaxbn.batch_norm(xb, S, training=True, axis_name="d"), axis_name="d")(xb[None])
        ys.append(y)
        new.append(s)
    mean, var, n = ref.moments(x[0], -1)
    want = ref.update(np.zeros(4), np.ones(4), 0, mean, var, n, momentum=0.99)
    np.testing.assert_allclose(new[0].mean[0], want[0], rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b), new[1], S)


# One momentum check (jaxbn._checks.check_momentum) behind every entry point: a string such as '0.9' is a
# TypeError everywhere (float('0.9') would have accepted it), out of range a ValueError, numbers and 0-d arrays fine.


def _momentum_entry_points():
    from flax import nnx

    import jaxbn.interop
    import jaxbn.linen
    import jaxbn.nnx

    x = np.ones((4, 2), np.float32)
    return {
        "batch_norm": lambda m: _bn(momentum=m),
        "batch_renorm": lambda m: jaxbn.batch_renorm(X, S, training=True, momentum=m),
        "update_stats": lambda m: jaxbn.update_stats(S, jaxbn.moments(X), momentum=m),
        "linen": lambda m: jaxbn.linen.BatchNorm(use_running_average=False, momentum=m).init(jax.random.key(0), x),
        "nnx": lambda m: jaxbn.nnx.BatchNorm(2, momentum=m, rngs=nnx.Rngs(0)),
        "torch_momentum_to_jaxbn": jaxbn.interop.torch_momentum_to_jaxbn,
        "jaxbn_momentum_to_torch": jaxbn.interop.jaxbn_momentum_to_torch,
    }


@pytest.mark.parametrize(
    "entry", ["batch_norm", "batch_renorm", "update_stats", "linen", "nnx", "torch_momentum_to_jaxbn",
              "jaxbn_momentum_to_torch"]
)
def test_momentum_is_checked_the_same_everywhere(entry):
    call = _momentum_entry_points()[entry]
    for bad in ("0.9", b"0.9", True, [0.9], jnp.ones(2)):
        with pytest.raises(TypeError, match=r"momentum must be a float in \[0, 1\] or None, got"):
            call(bad)
    for out in (1.5, -0.1, np.float32(2.0)):
        with pytest.raises(ValueError, match=r"momentum=.* is outside \[0, 1\]"):
            call(out)
    for ok in (0.9, 1, np.float64(0.5), jnp.asarray(0.9), None):
        call(ok)


def test_torch_momentum_message_speaks_of_torch():
    import jaxbn.interop

    with pytest.raises(ValueError, match=r"PyTorch's momentum is the weight of the new batch"):
        jaxbn.interop.torch_momentum_to_jaxbn(2.0)
    with pytest.raises(ValueError, match=r"PyTorch's 0.1 is jaxbn's 0.9"):
        jaxbn.interop.jaxbn_momentum_to_torch(2.0)


@pytest.mark.parametrize("size", [0, -2, 2.0, True, "4"])
def test_virtual_batch_size_is_checked_by_both_modules(size):
    from flax import nnx

    import jaxbn.linen
    import jaxbn.nnx

    x = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"virtual_batch_size must be None or an int >= 1, got"):
        jaxbn.linen.BatchNorm(use_running_average=False, virtual_batch_size=size).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"virtual_batch_size must be None or an int >= 1, got"):
        jaxbn.nnx.BatchNorm(2, virtual_batch_size=size, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("strategy", ["mean", "", None, 1, "PSUM"])
def test_strategy_is_checked_by_every_entry_point(strategy):
    """The functional core at trace time, the flax and haiku modules when built (linen: when first called)."""
    import haiku as hk
    from flax import nnx

    import jaxbn.haiku
    import jaxbn.linen
    import jaxbn.nnx

    x = np.ones((4, 2), np.float32)
    match = r"strategy must be 'auto', 'gather' or 'psum', got "
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda x: _bn(x=x, strategy=strategy))(X)
    with pytest.raises(ValueError, match=match):
        jaxbn.moments(x, strategy=strategy)
    with pytest.raises(ValueError, match=match):
        jaxbn.linen.BatchNorm(use_running_average=False, strategy=strategy).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=match):
        jaxbn.nnx.BatchNorm(2, strategy=strategy, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        hk.transform_with_state(lambda x: jaxbn.haiku.BatchNorm(True, True, 0.9, strategy=strategy)(x, True)).init(
            jax.random.key(0), x
        )


@pytest.mark.parametrize("path, error, match", [
    (3, TypeError, r"layer path must be a module name, an 'a/b' path or a tuple of names, got 3"),
    (("a", 1), TypeError, r"layer path must be a module name"),
    ("//", ValueError, r"layer path must name a module, got '//'"),
])
def test_module_paths_are_checked(path, error, match):
    import jaxbn.interop

    v = {"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}, "batch_stats": {}}
    with pytest.raises(error, match=match):
        jaxbn.interop.fold_linen(v, [(path, "BatchNorm_0")])


def test_float_checks_name_the_argument_in_fold_and_interop():
    import jaxbn.interop

    with pytest.raises(TypeError, match=r"kernel must be a floating-point array, got dtype int32 with shape \(3, 2\)"):
        jaxbn.fold(jnp.ones((3, 2), jnp.int32), None, S._replace(mean=jnp.zeros(2), var=jnp.ones(2)))
    with pytest.raises(TypeError, match=r"weight must be a floating-point array, got dtype complex64"):
        jaxbn.interop.from_torch({"weight": np.ones(2, np.complex64), "bias": np.zeros(2),
                                  "running_mean": np.zeros(2), "running_var": np.ones(2)})
