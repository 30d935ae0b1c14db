"""jaxbn._xla: the CPU-only barriers change no value, and the form other backends run is right too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
import jaxbn._xla as xla
from tests import reference as ref


def _step(x, dy):
    def loss(x, scale, bias):
        y, _ = jaxbn.batch_norm(x, jaxbn.init_stats(x.shape[-1]), scale, bias, training=True)
        return jnp.sum(y.astype(jnp.float32) * dy)

    c = x.shape[-1]
    return jax.grad(loss, argnums=(0, 1, 2))(x, jnp.full(c, 1.5), jnp.zeros(c))


@pytest.mark.parametrize("plain", [False, True], ids=["cpu form", "plain form"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_forms_give_the_float64_gradients(plain, dtype, monkeypatch):
    if plain:
        monkeypatch.setattr(xla, "splits_sibling_reductions", lambda: False)
    jax.clear_caches()  # traced afresh in this form
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3.0, 2.0, size=(16, 4, 4, 5)), dtype)
    dy = rng.normal(size=x.shape).astype(np.float32)
    dx, dscale, dbias = jax.jit(_step)(x, dy)
    want = ref.bn_train_grads(np.asarray(x, np.float64), dy, np.full(5, 1.5))
    tol = 1e-4 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(np.asarray(dx, np.float64), want[0], rtol=tol, atol=tol)
    np.testing.assert_allclose(dscale, want[1], rtol=tol, atol=tol)
    np.testing.assert_allclose(dbias, want[2], rtol=tol, atol=tol)


def test_the_barriers_run_on_the_cpu_backend_only(monkeypatch):
    """On XLA:CPU the lowered bfloat16 step holds jaxbn's optimization barriers on top of the one
    `jax.checkpoint` adds; the form other backends run holds fewer: only those of remat."""
    x = jnp.ones((8, 3), jnp.bfloat16)

    def barriers():
        jax.clear_caches()  # the other form traced afresh
        lowered = jax.jit(lambda x, dy: _step(x, dy)).lower(x, np.ones((8, 3), np.float32))
        return lowered.as_text().count("optimization_barrier")

    cpu_form = barriers()
    monkeypatch.setattr(xla, "splits_sibling_reductions", lambda: False)
    assert barriers() < cpu_form


def test_predicates_on_this_backend():
    assert xla.splits_sibling_reductions() == (jax.default_backend() == "cpu")
    assert xla.wide_collectives() == (jax.default_backend() != "tpu")
