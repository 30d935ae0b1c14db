"""Haiku: `jaxbn.haiku.BatchNorm` as a drop-in for `hk.BatchNorm`, side by side.

Shows three things:

1. The same small ConvNet (conv -> BatchNorm -> relu, twice, global mean
   pooling, linear head) trained with optax on scikit-learn's digits (8x8
   images, shipped with scikit-learn) once with ``hk.BatchNorm`` and once with
   ``jaxbn.haiku.BatchNorm``: same seed, same batches, same parameter and
   state trees; the test accuracies come out alike (the maths agree where
   haiku is right).
2. The large-offset fault: float32 data ``1e4 + N(0, 1)`` (true variance ~1).
   haiku's ``E[x^2] - E[x]^2`` gives a wrong, often negative, variance and NaN
   outputs; jaxbn's moving average matches the float64 value.
3. bf16 inputs: haiku computes and stores the statistics in bf16; jaxbn in
   float32. Errors are relative to the float64 statistics of the same bf16 data.
4. A batch with an inf (an overflowing mixed-precision step that the optimizer
   skips): haiku's moving averages become NaN for good; jaxbn's skip the batch.

Run (``JAXBN_FAST=1`` for a shorter run)::

    python examples/haiku_example.py
"""

import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxbn.haiku

FAST = os.environ.get("JAXBN_FAST") == "1"
STEPS = 60 if FAST else 600
BATCH = 32


def make_model(batch_norm_cls):
    """hk.transform_with_state of the ConvNet, with `batch_norm_cls` as its batch norm."""

    def forward(x, is_training):
        for width in (16, 32):
            x = hk.Conv2D(width, 3, with_bias=False)(x)
            x = jax.nn.relu(batch_norm_cls(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training))
        return hk.Linear(10)(x.mean(axis=(1, 2)))

    return hk.transform_with_state(forward)


def train(batch_norm_cls, x_tr, y_tr, x_te, y_te):
    model = make_model(batch_norm_cls)
    optimizer = optax.adam(1e-2)
    params, state = jax.jit(model.init, static_argnums=2)(jax.random.key(0), x_tr[:BATCH], True)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, state, opt_state, x, y):
        def loss_fn(params):
            logits, new_state = model.apply(params, state, None, x, True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), state, opt_state, loss

    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        idx = rng.choice(len(x_tr), BATCH, replace=False)
        params, state, opt_state, loss = train_step(params, state, opt_state, x_tr[idx], y_tr[idx])
    logits, _ = jax.jit(model.apply, static_argnums=4)(params, state, None, x_te, False)
    return float(jnp.mean(jnp.argmax(logits, -1) == y_te)), float(loss), params, state


def one_layer_statistics(batch_norm_cls, x):
    """One training step of one layer on `x`: (output, moving mean, moving var)."""
    model = hk.transform_with_state(lambda x: batch_norm_cls(True, True, 0.9)(x, True))
    params, state = jax.jit(model.init)(None, x)
    y, state = jax.jit(model.apply)(params, state, None, x)
    return y, state["batch_norm/~/mean_ema"]["average"].ravel(), state["batch_norm/~/var_ema"]["average"].ravel()


def poisoned_statistics(batch_norm_cls, x_good, x_bad):
    """Moving (mean, var) after a good step and then a step on `x_bad`."""
    model = hk.transform_with_state(lambda x: batch_norm_cls(True, True, 0.9)(x, True))
    params, state = jax.jit(model.init)(None, x_good)
    apply = jax.jit(model.apply)
    _, state = apply(params, state, None, x_good)
    _, state = apply(params, state, None, x_bad)
    return state["batch_norm/~/mean_ema"]["average"].ravel(), state["batch_norm/~/var_ema"]["average"].ravel()


def main() -> None:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target.astype(np.int32), test_size=0.2, random_state=0)

    print(f"1. ConvNet on digits, {STEPS} Adam steps, batch {BATCH}")
    results = {}
    for name, cls in (("hk.BatchNorm", hk.BatchNorm), ("jaxbn.haiku.BatchNorm", jaxbn.haiku.BatchNorm)):
        acc, loss, params, state = train(cls, x_tr, y_tr, x_te, y_te)
        results[name] = (params, state)
        print(f"   {name:22s} test accuracy {acc:.4f}  last loss {loss:.4f}")
        assert acc > 0.5
    trees = [jax.tree.map(lambda a: (a.shape, a.dtype), r) for r in results.values()]
    print(f"   identical parameter and state trees (checkpoints interchange): {trees[0] == trees[1]}")

    x_big = (1e4 + np.random.default_rng(1).normal(size=(64, 4))).astype(np.float32)
    true_var = x_big.astype(np.float64).var(axis=0)
    print("\n2. float32 1e4 + N(0, 1): moving variance after one step (float64 truth first)")
    print(f"   {'float64 truth':22s} {np.round(true_var, 4)}")
    for name, cls in (("hk.BatchNorm", hk.BatchNorm), ("jaxbn.haiku.BatchNorm", jaxbn.haiku.BatchNorm)):
        y, _, var = one_layer_statistics(cls, x_big)
        print(f"   {name:22s} {np.round(np.asarray(var, np.float64), 4)}  NaN outputs: "
              f"{int(np.isnan(np.asarray(y)).sum())} of {y.size}")

    x_bf16 = (100.0 + 3.0 * np.random.default_rng(2).normal(size=(256, 4))).astype(jnp.bfloat16)
    true_var = np.asarray(x_bf16, np.float64).var(axis=0)
    print("\n3. bf16 input 100 + 3 N(0, 1): moving variance after one step, dtype, max relative error")
    print(f"   {'float64 truth':22s} {np.round(true_var, 3)}")
    for name, cls in (("hk.BatchNorm", hk.BatchNorm), ("jaxbn.haiku.BatchNorm", jaxbn.haiku.BatchNorm)):
        _, _, var = one_layer_statistics(cls, x_bf16)
        err = np.abs(np.asarray(var, np.float64) / true_var - 1).max()
        print(f"   {name:22s} {np.round(np.asarray(var, np.float64), 3)}  {str(var.dtype):8s}  {err:.1e}")

    x_good = np.random.default_rng(3).normal(size=(32, 3)).astype(np.float32)
    x_bad = x_good.copy()
    x_bad[0, 0] = np.inf
    print("\n4. a good batch, then one with an inf in feature 0: moving mean and var")
    good = x_good.astype(np.float64)
    print(f"   {'float64, good batch':22s} {np.round(good.mean(0), 4)}  {np.round(good.var(0), 4)}")
    for name, cls in (("hk.BatchNorm", hk.BatchNorm), ("jaxbn.haiku.BatchNorm", jaxbn.haiku.BatchNorm)):
        mean, var = poisoned_statistics(cls, x_good, x_bad)
        print(f"   {name:22s} {np.round(np.asarray(mean), 4)}  {np.round(np.asarray(var), 4)}")


if __name__ == "__main__":
    main()
