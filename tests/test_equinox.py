"""jaxbn.equinox.BatchNorm: a drop-in for equinox.nn.BatchNorm.

References: float64 numpy formulas (tests/reference.py), equinox's own
`eqx.nn.BatchNorm` wherever it is right (outputs, statistics, gradients), and
the single-device result on the whole batch for the multi-device paths. Each
equinox fault that jaxbn fixes is shown next to equinox's measured value.
Equinox's test settings hold throughout: dtype promotion "strict", rank
promotion "raise" (conftest.py), warnings as errors.
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn.equinox
from tests import reference as ref
from tests.conftest import require_devices
from tests.reference import bernoulli, normal

BatchNorm = jaxbn.equinox.BatchNorm
EPS = 1e-5


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def make(cls, *args, **kwargs):
    return eqx.nn.make_with_state(cls)(*args, **kwargs)


@eqx.filter_jit
def vstep(bn, x, state, mask=None, inference=None):
    """The layer over a batch: jax.vmap with axis_name "batch", state unbatched."""
    if mask is None:
        return jax.vmap(lambda e, s: bn(e, s, inference=inference), axis_name="batch",
                        in_axes=(0, None), out_axes=(0, None))(x, state)
    return jax.vmap(lambda e, s, m: bn(e, s, inference=inference, mask=m), axis_name="batch",
                    in_axes=(0, None, 0), out_axes=(0, None))(x, state, mask)


def stats_of(bn, state):
    index = bn.batch_state_index if bn.mode == "batch" else bn.ema_state_index
    mean, var = state.get(index)
    return np.asarray(mean, np.float64), np.asarray(var, np.float64)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------- drop-in surface


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_fields_and_state_layout_match_equinox(mode):
    ours, s_ours = make(BatchNorm, 4, "batch", mode=mode)
    theirs, s_theirs = make(eqx.nn.BatchNorm, 4, "batch", mode=mode)
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]
    for f_ours, f_theirs in zip(dataclasses.fields(ours), dataclasses.fields(theirs), strict=True):
        assert f_ours.metadata.get("static", False) == f_theirs.metadata.get("static", False), f_ours.name
    kinds = lambda m: [(type(a).__name__, getattr(a, "shape", None)) for a in jax.tree.leaves(m)]  # noqa: E731
    assert kinds(ours) == kinds(theirs)  # the same leaves in the same order: checkpoints line up
    # The same state entries, shapes and dtypes (weak types included), in the same order.
    spec = lambda s: [(a.shape, a.dtype, a.weak_type) for a in jax.tree.leaves(s)]  # noqa: E731
    assert spec(s_ours) == spec(s_theirs)
    for name in ("ema_first_time_index", "ema_state_index", "batch_counter", "batch_state_index"):
        assert (getattr(ours, name) is None) == (getattr(theirs, name) is None), name
    assert ours.weight.dtype == theirs.weight.dtype == jnp.float32
    assert (ours.input_size, ours.eps, ours.momentum, ours.mode, ours.axis_name, ours.inference) == (
        theirs.input_size, theirs.eps, theirs.momentum, theirs.mode, theirs.axis_name, theirs.inference)
    # Running statistics start at mean 0, var 1 in both modes (equinox: "ema" starts from jnp.empty).
    mean, var = stats_of(ours, s_ours)
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(var, 1.0)


def test_legacy_mode_warns_as_equinox_does():
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        eqx.nn.BatchNorm(3, "batch")
    with pytest.warns(UserWarning, match="defaults to 'ema'") as ours:
        bn = BatchNorm(3, "batch")
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert bn.mode == "ema"


def test_bad_mode_raises_equinoxs_error():
    with pytest.raises(ValueError, match="Invalid mode, must be 'ema' or 'batch'.") as theirs:
        eqx.nn.BatchNorm(3, "batch", mode="bogus")
    with pytest.raises(ValueError, match="Invalid mode, must be 'ema' or 'batch'.") as ours:
        BatchNorm(3, "batch", mode="bogus")
    assert str(ours.value) == str(theirs.value)


def test_dtypes_as_equinox():
    bn, state = make(BatchNorm, 3, "batch", dtype=jnp.bfloat16, mode="batch")
    theirs, _ = make(eqx.nn.BatchNorm, 3, "batch", dtype=jnp.bfloat16, mode="batch")
    assert bn.weight.dtype == bn.bias.dtype == theirs.weight.dtype == jnp.bfloat16
    mean, var = state.get(bn.batch_state_index)
    assert mean.dtype == var.dtype == jnp.float32  # statistics: at least float32 (equinox: bf16)
    x = normal(0, (6, 3))
    y, state = vstep(bn, x, state)
    assert y.dtype == jnp.float32  # equinox's rule: promotion of float32 input and bf16 params
    assert bn.channelwise_affine and BatchNorm(3, "b", channelwise_affine=False, mode="batch").weight is None


def test_inference_mode_and_zero_training_steps():
    x = normal(1, (5, 3, 2))
    for mode in ("batch", "ema"):
        bn, state = make(BatchNorm, 3, "foo", mode=mode)
        ibn = eqx.nn.inference_mode(bn)
        assert ibn.inference and not bn.inference
        y, new_state = vstep(ibn, x, state)
        # Running stats (0, 1): inference before training is the identity, up to 1/sqrt(1 + eps).
        close(y, x / np.sqrt(1 + EPS), 1e-6)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state),
                                                        strict=True))
        y2, _ = vstep(bn, x, state, inference=True)  # the call's `inference` overrides the field
        close(y2, y, 0)


# ---------------------------------------------------------------- parity with equinox where it is right


@pytest.mark.parametrize("mode", ["batch", "ema"])
@pytest.mark.parametrize("shape", [(8, 3), (6, 3, 4, 2)], ids=["NC", "NCHW"])
def test_training_matches_equinox_and_float64_reference(mode, shape):
    ours, s_ours = make(BatchNorm, 3, "batch", mode=mode, momentum=0.9)
    theirs, s_theirs = make(eqx.nn.BatchNorm, 3, "batch", mode=mode, momentum=0.9)
    w, b = normal(2, (3,)) + 1.0, normal(3, (3,))
    ours = eqx.tree_at(lambda m: (m.weight, m.bias), ours, (jnp.asarray(w), jnp.asarray(b)))
    theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs, (jnp.asarray(w), jnp.asarray(b)))
    run_mean, run_var = np.zeros(3), np.ones(3)
    for step in range(3):
        x = normal(10 + step, shape) * (1 + step) + step
        y, s_ours = vstep(ours, x, s_ours)
        y_eqx, s_theirs = vstep(theirs, x, s_theirs)
        mean, var, n = ref.moments(x, axis=1)
        if mode == "batch" or step == 0:
            run_mean, run_var, _ = ref.update(run_mean, run_var, step, mean, var, n, momentum=0.9)
            if mode == "ema":  # the first training step takes the batch moments as they are
                run_mean, run_var = mean, var
            norm_mean, norm_var = (mean, var) if mode == "batch" else (run_mean, run_var)
        else:  # "ema": normalize with the running stats after folding in this batch
            run_mean, run_var, _ = ref.update(run_mean, run_var, step, mean, var, n, momentum=0.9)
            norm_mean, norm_var = run_mean, run_var
        close(y, ref.normalize(x, norm_mean, norm_var, w, b, axis=1, eps=EPS), 2e-5)
        close(y, y_eqx, 2e-5)
        close(stats_of(ours, s_ours)[0], run_mean, 1e-6)
        close(stats_of(ours, s_ours)[1], run_var, 2e-6)
        close(stats_of(ours, s_ours)[0], stats_of(theirs, s_theirs)[0], 1e-6)
        close(stats_of(ours, s_ours)[1], stats_of(theirs, s_theirs)[1], 2e-6)
    if mode == "batch":
        assert int(s_ours.get(ours.batch_counter)) == int(s_theirs.get(theirs.batch_counter)) == 3
    else:
        assert not bool(s_ours.get(ours.ema_first_time_index))


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_gradients_match_equinox_and_closed_form(mode):
    shape = (6, 3, 4)
    x, dy = normal(20, shape) * 2 + 1, normal(21, shape)
    w, b = normal(22, (3,)) + 1.0, normal(23, (3,))

    def grads(cls, state_from=None):
        bn, state = make(cls, 3, "batch", mode=mode)
        bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (jnp.asarray(w), jnp.asarray(b)))
        if state_from is not None:  # "ema": a second step, the running stats already set
            _, state = vstep(bn, state_from, state)

        @eqx.filter_jit
        @eqx.filter_grad
        def loss_grad(parts, bn_rest, x):
            xb, weight, bias = parts
            m = eqx.tree_at(lambda m: (m.weight, m.bias), bn_rest, (weight, bias))
            y, _ = jax.vmap(lambda e, s: m(e, s), axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xb, state)
            return jnp.sum(y * dy)

        return loss_grad((jnp.asarray(x), bn.weight, bn.bias), bn, x)

    for state_from in ([None] if mode == "batch" else [None, normal(24, shape)]):
        ours, theirs = grads(BatchNorm, state_from), grads(eqx.nn.BatchNorm, state_from)
        for g_ours, g_theirs in zip(ours, theirs, strict=True):
            close(g_ours, g_theirs, 5e-5)
    if mode == "batch":
        dx, dw, db = ref.bn_train_grads(x, dy, w, axis=1, eps=EPS)
        close(ours[0], dx, 5e-5)
        close(ours[1], dw, 5e-5)
        close(ours[2], db, 5e-5)


def test_sequence_of_axis_names_and_nested_vmaps():
    x = normal(30, (4, 2, 3, 5))
    bn, state = make(BatchNorm, 3, ["outer", "inner"], mode="batch")  # a list, as equinox allows
    f = jax.vmap(jax.vmap(bn, axis_name="inner", in_axes=(0, None), out_axes=(0, None)),
                 axis_name="outer", in_axes=(0, None), out_axes=(0, None))
    y, state = jax.jit(f)(x, state)
    flat = x.reshape(8, 3, 5)
    mean, var, n = ref.moments(flat, axis=1)
    close(y.reshape(flat.shape), ref.normalize(flat, mean, var, axis=1, eps=EPS), 2e-5)
    close(stats_of(bn, state)[1], 0.99 + 0.01 * var, 1e-6)


def test_one_value_per_feature_and_integer_input_as_equinox():
    with jax.numpy_dtype_promotion("standard"):  # equinox needs it for integer input
        for x in (normal(31, (1, 3)), np.arange(12, dtype=np.int32).reshape(4, 3)):
            ours, s_ours = make(BatchNorm, 3, "batch", mode="batch")
            theirs, s_theirs = make(eqx.nn.BatchNorm, 3, "batch", mode="batch")
            bias = jnp.asarray(normal(32, (3,)))
            ours, theirs = (eqx.tree_at(lambda m: m.bias, m, bias) for m in (ours, theirs))
            y, s_ours = vstep(ours, x, s_ours)
            y_eqx, s_theirs = vstep(theirs, x, s_theirs)
            assert y.dtype == y_eqx.dtype == jnp.float32
            close(y, y_eqx, 1e-5)
            close(stats_of(ours, s_ours)[1], stats_of(theirs, s_theirs)[1], 1e-6)
    close(y, ref.normalize(x, [4.5, 5.5, 6.5], [11.25] * 3, None, bias, axis=1, eps=EPS), 1e-5)


# ---------------------------------------------------------------- equinox faults fixed, side by side


def test_eval_before_training_is_identity_equinox_955():
    x = normal(40, (4, 3)) * 3
    ours, s_ours = make(BatchNorm, 3, "batch", mode="ema")
    theirs, s_theirs = make(eqx.nn.BatchNorm, 3, "batch", mode="ema")
    y, _ = vstep(ours, x, s_ours, inference=True)
    y_eqx, _ = vstep(theirs, x, s_theirs, inference=True)
    close(y, ref.normalize(x, np.zeros(3), np.ones(3), axis=1, eps=EPS), 1e-6)
    # equinox: running stats from jnp.empty (zeros here), so it divides by sqrt(eps): x * 316.
    mean_eqx, var_eqx = stats_of(theirs, s_theirs)
    close(y_eqx, ref.normalize(x, mean_eqx, var_eqx, axis=1, eps=EPS), 1e-4)
    assert np.max(np.abs(np.asarray(y_eqx))) > 100 * np.max(np.abs(x))


def test_batch_mode_inference_has_no_inflating_debias():
    momentum, steps = 0.99, 10
    ours, s_ours = make(BatchNorm, 2, "batch", mode="batch", momentum=momentum)
    theirs, s_theirs = make(eqx.nn.BatchNorm, 2, "batch", mode="batch", momentum=momentum)
    run_mean, run_var = np.zeros(2), np.ones(2)
    for k in range(steps):
        x = normal(50 + k, (16, 2)) * 3 + 1
        _, s_ours = vstep(ours, x, s_ours)
        _, s_theirs = vstep(theirs, x, s_theirs)
        mean, var, n = ref.moments(x, axis=1)
        run_mean, run_var, _ = ref.update(run_mean, run_var, k, mean, var, n, momentum=momentum)
    x = normal(60, (8, 2)) * 3 + 1
    y, _ = vstep(ours, x, s_ours, inference=True)
    y_eqx, _ = vstep(theirs, x, s_theirs, inference=True)
    close(y, ref.normalize(x, run_mean, run_var, axis=1, eps=EPS), 1e-5)
    # equinox divides the hidden stats by 1 - momentum**k. Its inference variance, read off its
    # output (var(x) / var(y) - eps), is the debiased average of the batch variances plus
    # momentum**k / (1 - momentum**k) = +9.5 after 10 steps at 0.99, from the initial var of 1.
    debias = 1 - momentum**steps
    close(y_eqx, ref.normalize(x, run_mean / debias, run_var / debias, axis=1, eps=EPS), 1e-4)
    var_eqx = np.var(x.astype(np.float64), axis=0) / np.var(np.asarray(y_eqx, np.float64), axis=0) - EPS
    average_batch_var = (run_var - momentum**steps) / debias
    np.testing.assert_allclose(var_eqx - average_batch_var, momentum**steps / debias, atol=0.01)
    assert 9.4 < momentum**steps / debias < 9.5
    assert np.all(var_eqx > 1.9 * average_batch_var)
    var_ours = np.var(x.astype(np.float64), axis=0) / np.var(np.asarray(y, np.float64), axis=0) - EPS
    np.testing.assert_allclose(var_ours, run_var, rtol=1e-4)


def test_stable_variance_at_large_offset():
    x = (1e4 + normal(70, (64, 2, 8)).astype(np.float64)).astype(np.float32)
    mean, var, n = ref.moments(x, axis=1)
    ours, s_ours = make(BatchNorm, 2, "batch", mode="batch", momentum=0.0)
    theirs, s_theirs = make(eqx.nn.BatchNorm, 2, "batch", mode="batch", momentum=0.0)
    _, s_ours = vstep(ours, x, s_ours)
    _, s_theirs = vstep(theirs, x, s_theirs)
    np.testing.assert_allclose(stats_of(ours, s_ours)[1], var, rtol=1e-3)
    # equinox's two-pass variance is right here too (shown for comparison).
    np.testing.assert_allclose(stats_of(theirs, s_theirs)[1], var, rtol=1e-2)


def test_bf16_input_float32_statistics():
    x = (100 + normal(71, (32, 2, 8)) * 3).astype(jnp.bfloat16)
    mean, var, n = ref.moments(np.asarray(x, np.float32), axis=1)
    ours, s_ours = make(BatchNorm, 2, "batch", mode="batch", momentum=0.0)
    y, s_ours = vstep(ours, x, s_ours)
    assert y.dtype == jnp.float32 and stats_of(ours, s_ours)[0].dtype == np.float64
    assert s_ours.get(ours.batch_state_index)[1].dtype == jnp.float32
    np.testing.assert_allclose(stats_of(ours, s_ours)[0], mean, rtol=1e-6)
    np.testing.assert_allclose(stats_of(ours, s_ours)[1], var, rtol=1e-4)
    theirs, s_theirs = make(eqx.nn.BatchNorm, 2, "batch", mode="batch", momentum=0.0)
    # equinox under its own test settings (strict) refuses the bf16/float32 mix: jax's TypePromotionError,
    # a TypeError in newer jax and a ValueError (not exported from jax.dtypes) in jax 0.10.0
    with pytest.raises((TypeError, ValueError), match="no available implicit dtype promotion path"):
        vstep(theirs, x, s_theirs)
    with jax.numpy_dtype_promotion("standard"):
        _, s_theirs = vstep(theirs, x, s_theirs)
    # equinox reduces in bf16: its mean and variance are off by bf16 rounding (measured, not asserted exactly).
    err_eqx = np.max(np.abs(stats_of(theirs, s_theirs)[1] / var - 1))
    err_ours = np.max(np.abs(stats_of(ours, s_ours)[1] / var - 1))
    assert err_ours < 1e-4 < err_eqx


def test_state_keeps_its_dtype():
    bn, state = make(BatchNorm, 3, "batch", mode="batch")
    index = bn.batch_state_index
    # A user-cast state (State.set refuses dtype changes; a tree map builds a new State).
    state = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, state)
    with pytest.warns(UserWarning, match="stored in bfloat16 .* stop moving"):  # said loudly, as documented
        _, state = vstep(bn, normal(72, (4, 3)), state)
    assert [a.dtype for a in state.get(index)] == [jnp.bfloat16, jnp.bfloat16]


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_float64_state_under_x64_is_updated_in_float64(mode):
    """With jax x64 the statistics are float64 and exact to float64 rounding (they were rounded
    through float32, 2-5e-8 off), as equinox's own."""
    with jax.enable_x64(True):
        ours, s_ours = make(BatchNorm, 3, "batch", mode=mode, momentum=0.9)
        theirs, s_theirs = make(eqx.nn.BatchNorm, 3, "batch", mode=mode, momentum=0.9)
        run_mean, run_var = np.zeros(3), np.ones(3)
        for step in range(3):
            x = np.random.default_rng(80 + step).normal(size=(16, 3)) * (1 + step) + 1.0 / 3.0
            _, s_ours = vstep(ours, jnp.asarray(x), s_ours)
            _, s_theirs = vstep(theirs, jnp.asarray(x), s_theirs)
            mean, var, n = ref.moments(x, axis=1)
            if mode == "ema" and step == 0:  # the first training step takes the batch moments as they are
                run_mean, run_var = mean, var
            else:
                run_mean, run_var, _ = ref.update(run_mean, run_var, step, mean, var, n, momentum=0.9)
        got_mean, got_var = (state_leaf for state_leaf in s_ours.get(
            ours.batch_state_index if mode == "batch" else ours.ema_state_index))
        assert got_mean.dtype == got_var.dtype == jnp.float64
        np.testing.assert_allclose(got_mean, run_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got_var, run_var, rtol=1e-12)
        if mode == "ema":  # equinox keeps float64 too (its "batch" mode debiases, see below)
            np.testing.assert_allclose(got_var, stats_of(theirs, s_theirs)[1], rtol=1e-12)


def test_non_finite_batch_keeps_running_stats():
    for mode in ("batch", "ema"):
        bn, state = make(BatchNorm, 2, "batch", mode=mode)
        _, state = vstep(bn, normal(73, (4, 2)), state)
        before = stats_of(bn, state)
        x = normal(74, (4, 2))
        x[1, 0] = np.inf
        _, state = vstep(bn, x, state)
        after = stats_of(bn, state)
        close(after[0][0], before[0][0], 0)  # feature 0 saw an inf: kept
        close(after[1][0], before[1][0], 0)
        assert np.all(np.isfinite(after[0])) and np.all(np.isfinite(after[1]))
        assert after[0][1] != before[0][1]  # feature 1 updated
        # equinox's running statistics take the inf in: NaN variance from then on.
        theirs, s_theirs = make(eqx.nn.BatchNorm, 2, "batch", mode=mode)
        _, s_theirs = vstep(theirs, normal(73, (4, 2)), s_theirs)
        _, s_theirs = vstep(theirs, x, s_theirs)
        assert not np.isfinite(stats_of(theirs, s_theirs)[1][0])
        close(stats_of(theirs, s_theirs)[1][1], after[1][1], 1e-6)  # the finite feature agrees


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_mask_matches_float64_reference(mode):
    x = normal(80, (6, 3, 5)) * 2 + 1
    mask = bernoulli(81, 0.6, (6, 1, 5))
    mask[0] = True
    bn, state = make(BatchNorm, 3, "batch", mode=mode, momentum=0.9)
    y, state = vstep(bn, x, state, jnp.asarray(mask))
    mean, var, n = ref.moments(x, axis=1, mask=mask)
    close(y, ref.normalize(x, mean, var, axis=1, eps=EPS), 2e-5)  # masked entries are normalized too
    expected = (mean, var) if mode == "ema" else ref.update(np.zeros(3), np.ones(3), 0, mean, var, n, momentum=0.9)
    close(stats_of(bn, state)[0], expected[0], 1e-6)
    close(stats_of(bn, state)[1], expected[1], 2e-6)


def test_fully_masked_batch_is_a_no_op():
    for mode in ("batch", "ema"):
        bn, state = make(BatchNorm, 2, "batch", mode=mode)
        _, new = vstep(bn, normal(82, (4, 2)), state, jnp.zeros((4,), bool))
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new), strict=True))


# ---------------------------------------------------------------- devices


def _mesh():
    require_devices(8)  # fewer devices: a failure that says how to get them, never a skip
    return jax.make_mesh((8,), ("data",))


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_shard_map_and_pmap_match_the_whole_batch(mode):
    mesh = _mesh()
    x = normal(90, (16, 3, 4)) * 2 + 1
    mask = bernoulli(91, 0.5, (16, 1, 4))
    mask[:6] = False  # devices 0-2 have no valid entry, the others uneven counts
    mask[6] = True
    single, s_single = make(BatchNorm, 3, "batch", mode=mode, momentum=0.9)
    y1, s1 = vstep(single, x, s_single, jnp.asarray(mask))
    mean, var, n = ref.moments(x, axis=1, mask=mask)
    close(y1, ref.normalize(x, mean, var, axis=1, eps=EPS), 2e-5)  # "ema" too: its first step

    bn, state = make(BatchNorm, 3, ("data", "batch"), mode=mode, momentum=0.9)

    def local(x, state, mask):
        return jax.vmap(lambda e, m: bn(e, state, mask=m), axis_name="batch", out_axes=(0, None))(x, mask)

    # check_vma=False: JAX's type check rejects collectives over a vmap axis inside shard_map.
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                                    out_specs=(P("data"), P()), check_vma=False))
    put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("data")))  # noqa: E731
    y2, s2 = sharded(put(x), state, put(mask))
    y3, s3 = jax.pmap(local, axis_name="data", in_axes=(0, None, 0), out_axes=(0, None))(
        x.reshape(8, 2, 3, 4), state, mask.reshape(8, 2, 1, 4))
    for y, s in ((y2, s2), (y3, s3)):
        close(np.asarray(y).reshape(x.shape), y1, 1e-5)
        for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s1), strict=True):
            close(a, b, 1e-6)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_serialise_round_trips_both_ways_with_equinox(mode):
    x = normal(100, (6, 3, 2))
    ours, s_ours = make(BatchNorm, 3, "batch", mode=mode)
    theirs, s_theirs = make(eqx.nn.BatchNorm, 3, "batch", mode=mode)
    ours = eqx.tree_at(lambda m: m.weight, ours, jnp.asarray(normal(101, (3,))))
    _, s_ours = vstep(ours, x, s_ours)
    _, s_ours = vstep(ours, x * 2 + 1, s_ours)

    def round_trip(src, like):
        buf = io.BytesIO()
        eqx.tree_serialise_leaves(buf, src)
        buf.seek(0)
        return eqx.tree_deserialise_leaves(buf, like)

    theirs, s_theirs = round_trip((ours, s_ours), (theirs, s_theirs))  # ours -> equinox's
    for a, b in zip(jax.tree.leaves((ours, s_ours)), jax.tree.leaves((theirs, s_theirs)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Equinox's layer continues training from our checkpoint exactly as ours does.
    y, s_ours2 = vstep(ours, x - 1, s_ours)
    y_eqx, s_theirs = vstep(theirs, x - 1, s_theirs)
    close(y, y_eqx, 2e-5)
    fresh, s_fresh = make(BatchNorm, 3, "batch", mode=mode)
    back, s_back = round_trip((theirs, s_theirs), (fresh, s_fresh))  # equinox's -> ours
    for a, b in zip(jax.tree.leaves((back, s_back)), jax.tree.leaves((theirs, s_theirs)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    close(stats_of(back, s_back)[1], stats_of(ours, s_ours2)[1], 1e-6)


# ---------------------------------------------------------------- errors


def test_unbound_axis_is_a_name_error():
    bn, state = make(BatchNorm, 3, "batch", mode="batch")
    with pytest.raises(NameError, match="batch"):
        bn(jnp.ones((3, 2)), state)
    with pytest.raises(NameError, match="batch"):
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(jnp.ones((4, 3)), state)
    ema, ema_state = make(BatchNorm, 3, "batch", mode="ema")
    with pytest.raises(NameError, match="batch"):
        jax.vmap(ema, axis_name="other", in_axes=(0, None), out_axes=(0, None))(jnp.ones((4, 3)), ema_state)


def test_bad_call_arguments():
    bn, state = make(BatchNorm, 3, "batch", mode="batch")
    with pytest.raises(ValueError, match=r"one example of shape \(input_size, \*spatial\) with input_size=3, got "
                                         r"shape \(4, 3\)"):
        vstep(bn, jnp.ones((2, 4, 3)), state)
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        bn(jnp.float32(1.0), state)
    with pytest.raises(ValueError, match=r"mask of shape \(2,\) does not broadcast to the example x of shape "
                                         r"\(3, 5\)"):
        vstep(bn, jnp.ones((4, 3, 5)), state, jnp.ones((4, 2), bool))
    with pytest.raises(TypeError, match="mask must be a boolean array, got dtype float32"):
        vstep(bn, jnp.ones((4, 3, 5)), state, jnp.ones((4, 5), jnp.float32))
    # Checked by jaxbn's core when the layer is called (equinox accepts them and divides by 0 / diverges).
    zero_eps, zero_eps_state = make(BatchNorm, 3, "batch", eps=0.0, mode="batch")
    with pytest.raises(ValueError, match="epsilon must be > 0, got 0.0"):
        vstep(zero_eps, jnp.ones((4, 3)), zero_eps_state)
    big_momentum, big_momentum_state = make(BatchNorm, 3, "batch", momentum=1.5, mode="ema")
    with pytest.raises(ValueError, match=r"momentum=1.5 is outside \[0, 1\]"):
        vstep(big_momentum, jnp.ones((4, 3)), big_momentum_state)


def test_import_jaxbn_does_not_import_equinox():
    code = "import sys, jaxbn, jaxbn.linen; assert 'equinox' not in sys.modules, 'equinox imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_docs_blocks_run():
    import os
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "equinox.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)
    assert len(blocks) >= 2
    assert len(blocks[0].strip().splitlines()) <= 15, "the quick start is at most 15 lines"
    for code in blocks:
        if code.lstrip().lower().startswith("# not run"):  # test_docs.py's convention: compiled only
            compile(code, path, "exec")
            continue
        exec(compile(code, path, "exec"), {"__name__": "__docs__"})
