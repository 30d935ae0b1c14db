# Upstream tests, run against jaxbn.equinox.BatchNorm.
#
# Source: https://github.com/patrick-kidger/equinox at tag v0.13.8
# (commit dfadb04884a0fc067fb85282c994f8e5c106941f, the equinox installed here), Apache-2.0:
#   tests/test_nn.py (last changed in b391a272ce5d0f329a2d2c9608fc44e4148be74b): every test that
#     builds an eqx.nn.BatchNorm: test_sequential, test_nested_sequential, test_batch_norm,
#     test_batch_norm_zero_training_steps;
#   tests/test_stateful.py (last changed in ef3dc63cfa6ab77b1b57c9854db92d46a07b5bee):
#     test_delete_init_state;
#   tests/conftest.py: the getkey fixture and the test settings (dtype promotion "strict",
#     rank promotion "raise"; the repository's conftest.py already sets the latter).
# The test bodies are copied verbatim. The substitution is done in code: `eqx` below is equinox
# with `eqx.nn.BatchNorm` replaced by `jaxbn.equinox.BatchNorm`, so every `eqx.nn.BatchNorm` in
# the bodies is jaxbn's class. No assertion needed adapting: none of these tests asserts one of
# the equinox faults jaxbn fixes (test_batch_norm_zero_training_steps checks that inference
# before training is the identity in "batch" mode, which holds for both).
#
# equinox runs its tests with jaxtyping's import hook and beartype on its own package
# (`--jaxtyping-packages=equinox,beartype.beartype(...)`); test_upstream_typechecked below runs
# the batch-norm tests of this file again in a subprocess with the hook on jaxbn.equinox
# (skipped when beartype is not installed).
#
# Run: python -m pytest tests/upstream/test_equinox_upstream.py

import os
import subprocess
import sys
import types

import equinox
import jax
import jax.numpy as jnp
import jax.random as jrandom
import jax.tree_util as jtu
import pytest

import jaxbn.equinox


class _Substituted(types.ModuleType):
    """`module` with some attributes replaced (everything else is the module's own)."""

    def __init__(self, module: types.ModuleType, **overrides: object):
        super().__init__(module.__name__)
        self.__dict__.update(vars(module))
        self.__dict__.update(overrides)


eqx = _Substituted(equinox, nn=_Substituted(equinox.nn, BatchNorm=jaxbn.equinox.BatchNorm))


@pytest.fixture(autouse=True)
def _equinox_test_settings():
    # equinox's tests/conftest.py sets these globally; here only for this file's tests.
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def getkey():
    import equinox.internal as eqxi

    return eqxi.GetKey()


def test_substitution_is_in_place():
    assert eqx.nn.BatchNorm is jaxbn.equinox.BatchNorm
    assert equinox.nn.BatchNorm is not jaxbn.equinox.BatchNorm
    assert eqx.nn.State is equinox.nn.State


# ---- from tests/test_nn.py ----


def test_sequential(getkey):
    seq = eqx.nn.Sequential(
        [
            eqx.nn.Linear(2, 4, key=getkey()),
            eqx.nn.Linear(4, 1, key=getkey()),
            eqx.nn.BatchNorm(1, axis_name="batch", mode="ema"),
            eqx.nn.Linear(1, 3, key=getkey()),
        ]
    )
    x = jrandom.normal(getkey(), (1, 2))
    batch_seq = jax.vmap(seq, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    state = eqx.nn.State(seq)

    output, state = batch_seq(x, state)
    assert output[0].shape == (3,)
    # Test indexing
    assert isinstance(seq[0], eqx.nn.Linear)
    assert isinstance(seq[1:], eqx.nn.Sequential)

    x = jrandom.normal(getkey(), (1, 4))
    batch_seq = jax.vmap(
        seq[1:],
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )
    output, state = batch_seq(x, state)
    assert output[0].shape == (3,)
    assert len(seq) == 4
    assert eqx.nn.Sequential(list(seq)) == seq



@pytest.mark.parametrize("inner_stateful", (False, True))
@pytest.mark.parametrize("outer_stateful", (False, True))
def test_nested_sequential(inner_stateful, outer_stateful, getkey):
    def make():
        inner_seq = eqx.nn.Sequential(
            [
                eqx.nn.Linear(2, 4, key=getkey()),
                eqx.nn.BatchNorm(4, axis_name="batch", mode="ema")
                if inner_stateful
                else eqx.nn.Identity(),
                eqx.nn.Linear(4, 3, key=getkey()),
            ]
        )
        outer_seq = eqx.nn.Sequential(
            [
                eqx.nn.Linear(5, 2, key=getkey()),
                inner_seq,
                eqx.nn.BatchNorm(3, axis_name="batch", mode="ema")
                if outer_stateful
                else eqx.nn.Identity(),
                eqx.nn.Linear(3, 6, key=getkey()),
            ]
        )
        return outer_seq

    x = jrandom.normal(getkey(), (1, 5))
    if inner_stateful or outer_stateful:
        model, state = eqx.nn.make_with_state(make)()
        out, state = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)
        assert isinstance(state, eqx.nn.State)
    else:
        model = make()
        out = jax.vmap(model, axis_name="batch")(x)
    assert isinstance(out, jax.Array)
    assert out.shape == (1, 6)



@pytest.mark.parametrize("mode", ("ema", "batch"))
def test_batch_norm(getkey, mode):
    x0 = jrandom.uniform(getkey(), (5,))
    x1 = jrandom.uniform(getkey(), (10, 5))
    x2 = jrandom.uniform(getkey(), (10, 5, 6))
    x3 = jrandom.uniform(getkey(), (10, 5, 7, 8))

    # Test that it works with a single vmap'd axis_name

    bn = eqx.nn.BatchNorm(5, "batch", mode=mode)
    state = eqx.nn.State(bn)
    vbn = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))

    for x in (x1, x2, x3):
        out, state = vbn(x, state)
        assert out.shape == x.shape
        if mode == "ema":
            assert bn.ema_state_index is not None
            running_mean, running_var = state.get(bn.ema_state_index)
        else:
            assert bn.batch_state_index is not None
            running_mean, running_var = state.get(bn.batch_state_index)
        assert running_mean.shape == (5,)
        assert running_var.shape == (5,)

    # Test that it fails without any vmap'd axis_name

    with pytest.raises(NameError):
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x1, state)
    state = eqx.nn.State(bn)

    with pytest.raises(NameError):
        bn(x0, state)
    state = eqx.nn.State(bn)

    # Test that it vmaps with other vmaps without axis_name

    out, state = jax.vmap(
        jax.vmap(bn, axis_name="batch", in_axes=(1, None), out_axes=(1, None)),
        in_axes=(0, None),
    )(x2, state)
    assert out.shape == x2.shape
    if mode == "ema":
        assert bn.ema_state_index is not None
        running_mean, running_var = state.get(bn.ema_state_index)
    else:
        assert bn.batch_state_index is not None
        running_mean, running_var = state.get(bn.batch_state_index)
    assert running_mean.shape == (10, 5)
    assert running_var.shape == (10, 5)

    # Test that it handles multiple axis_names

    vvbn = eqx.nn.BatchNorm(6, ("batch1", "batch2"), mode=mode)
    vvstate = eqx.nn.State(vvbn)
    for axis_name in ("batch1", "batch2"):
        vvbn = jax.vmap(
            vvbn, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None)
        )
    out, out_vvstate = vvbn(x2, vvstate)
    assert out.shape == x2.shape
    if mode == "ema":
        assert vvbn.ema_state_index is not None
        running_mean, running_var = out_vvstate.get(vvbn.ema_state_index)
    else:
        assert vvbn.batch_state_index is not None
        running_mean, running_var = out_vvstate.get(vvbn.batch_state_index)
    assert running_mean.shape == (6,)
    assert running_var.shape == (6,)

    # Test that it normalises

    x1alt = jrandom.normal(jrandom.PRNGKey(5678), (10, 5))  # avoid flakey test
    bn = eqx.nn.BatchNorm(5, "batch", channelwise_affine=False, mode=mode)
    state = eqx.nn.State(bn)
    vbn = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    out, state = vbn(x1alt, state)
    true_out = (x1alt - jnp.mean(x1alt, axis=0, keepdims=True)) / jnp.sqrt(
        jnp.var(x1alt, axis=0, keepdims=True) + 1e-5
    )
    assert jnp.allclose(out, true_out)

    # Test that the statistics update during training
    out, state = vbn(x1, state)
    if mode == "ema":
        assert bn.ema_state_index is not None
        running_mean, running_var = state.get(bn.ema_state_index)
    else:
        assert bn.batch_state_index is not None
        running_mean, running_var = state.get(bn.batch_state_index)
    out, state = vbn(3 * x1 + 10, state)
    if mode == "ema":
        assert bn.ema_state_index is not None
        running_mean2, running_var2 = state.get(bn.ema_state_index)
    else:
        assert bn.batch_state_index is not None
        running_mean2, running_var2 = state.get(bn.batch_state_index)
    assert not jnp.allclose(running_mean, running_mean2)
    assert not jnp.allclose(running_var, running_var2)

    # Test that the statistics don't update at inference

    ibn = eqx.nn.inference_mode(bn, value=True)
    vibn = jax.vmap(ibn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    out, state = vibn(4 * x1 + 20, state)
    if mode == "ema":
        assert bn.ema_state_index is not None
        running_mean3, running_var3 = state.get(bn.ema_state_index)
    else:
        assert bn.batch_state_index is not None
        running_mean3, running_var3 = state.get(bn.batch_state_index)
    assert jnp.array_equal(running_mean2, running_mean3)
    assert jnp.array_equal(running_var2, running_var3)

    # Test that we can differentiate through it

    @jax.grad
    def f(x):
        out, _ = vbn(x, state)
        return jnp.sum(out)

    f(jrandom.normal(getkey(), (1, 5)))


# https://github.com/patrick-kidger/equinox/issues/1010
def test_batch_norm_zero_training_steps(getkey):
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        input_size=3, axis_name="foo", mode="batch", inference=True
    )
    x = jrandom.normal(getkey(), (5, 3))
    out, _ = jax.vmap(bn, in_axes=(0, None), axis_name="foo")(x, state)
    assert jnp.allclose(x, out)


# ---- from tests/test_stateful.py ----


def test_delete_init_state():
    model = eqx.nn.BatchNorm(3, "batch", mode="ema")
    eqx.nn.State(model)
    model2 = eqx.nn.delete_init_state(model)

    eqx.nn.State(model)
    with pytest.raises(ValueError):
        eqx.nn.State(model2)

    leaves = [x for x in jtu.tree_leaves(model) if eqx.is_array(x)]
    leaves2 = [x for x in jtu.tree_leaves(model2) if eqx.is_array(x)]
    assert len(leaves) == len(leaves2) + 3


# ---- the same tests with jaxtyping + beartype checking jaxbn.equinox, as equinox checks itself ----


def test_upstream_typechecked():
    pytest.importorskip("beartype")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__),
         "-k", "batch_norm and not typechecked", "--jaxtyping-packages=jaxbn.equinox,beartype.beartype"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
