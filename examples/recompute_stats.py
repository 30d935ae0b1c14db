"""Recomputing batch-norm statistics after weight averaging (SWA / EMA of weights).

Averaging weights (Stochastic Weight Averaging, or an EMA of the parameters)
gives a model whose layers see different activations from any model the
running statistics were collected on: evaluating the averaged weights with
the last model's ``batch_stats`` mixes two models. The fix is to recompute
the statistics for the averaged weights with one pass over training data:
``jaxbn.linen.recompute_batch_stats(model, variables, batches, train=True)``
("precise BN": exact population statistics, not an EMA).

This example trains a small Linen ConvNet with `jaxbn.linen.BatchNorm` on
scikit-learn's digits with a high constant learning rate, keeps an SWA
average and an EMA of the weights, and prints test accuracy for each with the
last model's statistics (before) and with recomputed statistics (after).

Run (``JAXBN_FAST=1`` for a shorter run)::

    python examples/recompute_stats.py
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxbn.linen

FAST = os.environ.get("JAXBN_FAST") == "1"
STEPS = 200 if FAST else 1500
SWA_START = STEPS // 2
SWA_EVERY = 10
BATCH = 32


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for features in (16, 32):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def main() -> None:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target.astype(np.int32), test_size=0.2, random_state=0)

    model = ConvNet()
    variables = model.init(jax.random.key(0), x_tr[:1], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.2, momentum=0.9)  # high constant learning rate: SWA's regime
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def accuracy(variables):
        logits = model.apply(variables, x_te, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y_te)

    rng = np.random.default_rng(0)
    swa, n_swa = None, 0
    ema, ema_decay = params, 0.99
    for step in range(1, STEPS + 1):
        idx = rng.choice(len(x_tr), BATCH, replace=False)
        params, batch_stats, opt_state, _ = train_step(params, batch_stats, opt_state, x_tr[idx], y_tr[idx])
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        if step >= SWA_START and step % SWA_EVERY == 0:  # SWA: equal-weight average of snapshots
            n_swa += 1
            swa = params if swa is None else jax.tree.map(lambda a, p, n=n_swa: a + (p - a) / n, swa, params)

    batches = [x_tr[i:i + 128] for i in range(0, len(x_tr), 128)]  # one pass over the training set
    rows = [("last model", params)]
    rows += [(f"SWA of {n_swa} snapshots", swa), (f"EMA of weights ({ema_decay})", ema)]
    print(f"{STEPS} steps of SGD(lr=0.2, momentum=0.9), batch {BATCH}; test accuracy:")
    print()
    print("| weights                 | last model's batch_stats | recomputed batch_stats |")
    print("| ----------------------- | ------------------------ | ---------------------- |")
    results = {}
    for name, p in rows:
        before = float(accuracy({"params": p, "batch_stats": batch_stats}))
        fixed = jaxbn.linen.recompute_batch_stats(model, {"params": p, "batch_stats": batch_stats}, batches,
                                                  train=True)
        after = float(accuracy(fixed))
        results[name] = (before, after)
        print(f"| {name:<23} | {before:>24.4f} | {after:>22.4f} |")
    swa_before, swa_after = results[rows[1][0]]
    print(f"\nSWA weights: {swa_before:.4f} with stale statistics -> {swa_after:.4f} after recompute_batch_stats")
    assert swa_after >= swa_before - 0.02


if __name__ == "__main__":
    main()
