"""The modules' path through the core: options validated once, `x` checked once per call."""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn._checks
import jaxbn.equinox
import jaxbn.linen
import jaxbn.nnx
from jaxbn._module_core import Options, forward
from tests import reference as ref

CHECKS = ("check_input", "check_trainable", "check_mask")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the argument checks, wherever a jaxbn module imported them."""
    counts = dict.fromkeys(CHECKS, 0)
    for name in CHECKS:
        original = getattr(jaxbn._checks, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        for module in [m for n, m in sys.modules.items() if n.startswith("jaxbn")]:
            if getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counted)
    return counts


X = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)


@pytest.mark.parametrize(
    "kw",
    [{}, {"renorm": True}, {"virtual_batch_size": 4}, {"momentum": None}],
    ids=["bn", "renorm", "ghost", "cumulative"],
)
def test_linen_checks_x_once(calls, kw):
    bn = jaxbn.linen.BatchNorm(use_running_average=False, **kw)
    variables = bn.init(jax.random.key(0), X)
    for k in calls:
        calls[k] = 0
    bn.apply(variables, X, mask=np.ones((8, 1), bool), mutable=["batch_stats"])
    assert calls == {"check_input": 1, "check_trainable": 1, "check_mask": 1}


def test_nnx_checks_x_once(calls):
    bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    bn(X)
    bn.eval()
    bn(X)
    assert calls == {"check_input": 2, "check_trainable": 1, "check_mask": 2}


def test_one_value_per_feature_checks_x_once(calls):
    """flax trains on one value per feature: the module core doubles it without checking it again."""
    y, _ = forward(X[:1], jaxbn.init_stats(3), None, None, options=Options(), training=True)
    np.testing.assert_array_equal(np.asarray(y), np.zeros((1, 3)))
    assert calls["check_input"] == 1


def test_equinox_mask_checked_once_with_its_message(calls):
    bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(3, "batch", mode="batch")
    x = jnp.asarray(X)
    mask = jnp.asarray(np.arange(8) % 3 > 0)
    y, _ = jax.vmap(lambda xb, mb: bn(xb, state, mask=mb), axis_name="batch", out_axes=(0, None))(x, mask)
    mean, var, _ = ref.moments(X, mask=np.asarray(mask)[:, None])
    np.testing.assert_allclose(np.asarray(y), ref.normalize(X, mean, var), rtol=1e-4, atol=1e-5)
    assert calls == {"check_input": 1, "check_trainable": 1, "check_mask": 1}


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"momentum": "0.9"}, TypeError, r"momentum must be a float in \[0, 1\] or None, got '0.9'"),
        ({"momentum": 1.5}, ValueError, r"momentum=1.5 is outside \[0, 1\]"),
        ({"epsilon": 0.0}, ValueError, r"epsilon must be > 0, got 0.0"),
        ({"virtual_batch_size": 0}, ValueError, r"virtual_batch_size must be None or an int >= 1, got 0"),
        ({"renorm": True, "renorm_r_max": 0.5}, ValueError, r"r_max must be >= 1, got 0.5"),
        ({"renorm": True, "renorm_d_max": -1.0}, ValueError, r"d_max must be >= 0, got -1.0"),
    ],
)
def test_bad_options_fail_when_built(kw, error, match):
    with pytest.raises(error, match=match):
        Options(**kw)
    with pytest.raises(error, match=match):  # NNX: when the layer is built, before any call
        jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **kw)


def test_renorm_clips_unchecked_without_renorm():
    """Like flax's fields, the clips of a layer without renorm are never used, so never refused."""
    assert Options(renorm_r_max=0.5).renorm_r_max == 0.5


def test_options_hashable_with_lists():
    """Lists from a config file become tuples: the options are a static jit argument."""
    a = Options(axis=[1, 2], axis_name=["data", "batch"], axis_index_groups=[[0, 1], [2, 3]])
    b = Options(axis=(1, 2), axis_name=("data", "batch"), axis_index_groups=((0, 1), (2, 3)))
    assert a == b and hash(a) == hash(b)
    assert a.axis == (1, 2) and a.axis_name == ("data", "batch")


@pytest.mark.parametrize("name", ["linen", "nnx", "equinox", "haiku", "interop"])
def test_every_wrapper_is_a_lazy_attribute_named_in_the_docstring(name):
    import jaxbn

    assert getattr(jaxbn, name) is sys.modules[f"jaxbn.{name}"]
    assert f"`jaxbn.{name}`" in jaxbn.__doc__


@pytest.mark.parametrize("momentum", [0.9, None])
def test_an_empty_training_batch_is_a_no_op(momentum):
    """Zero rows in training (e.g. a data loader's empty last batch): an empty output and the running statistics
    unchanged, as an all-masked batch leaves them (docs/contract.md, update_stats)."""
    bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=momentum)
    variables = bn.init(jax.random.key(0), jnp.asarray(X))
    y, updates = bn.apply(variables, jnp.asarray(X[:0]), mutable=["batch_stats"])
    assert y.shape == (0, 3) and y.dtype == jnp.float32
    for k in ("mean", "var"):
        np.testing.assert_array_equal(updates["batch_stats"][k], variables["batch_stats"][k])
    grad = jax.grad(lambda x: bn.apply(variables, x, mutable=["batch_stats"])[0].sum())(jnp.asarray(X[:0]))
    assert grad.shape == (0, 3)
