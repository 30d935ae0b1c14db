"""Fine-tuning a model you did not write: convert its flax BatchNorms to jaxbn's, freeze them, train the head.

The model below is written with flax's own ``nn.BatchNorm``, as a model from
elsewhere would be. It is "pretrained" briefly on scikit-learn's digits
(classes 0-4) with flax's layers; then, without editing it,

* ``jaxbn.linen.convert(model.apply)`` runs every ``nn.BatchNorm`` as a
  ``jaxbn.linen.BatchNorm`` on the same variables (``axis_name="batch"``
  would make it sync-BN under ``jax.pmap``, as PyTorch's
  ``convert_sync_batchnorm`` does);
* ``jaxbn.linen.freeze(...)`` freezes those layers (PyTorch's
  ``FrozenBatchNorm2d``): running statistics used, never updated;
* a new head is fine-tuned with optax on classes 5-9, the backbone's
  parameters masked out of the update.

It prints the accuracy of the fine-tuned head and checks that the running
statistics, the backbone and the variable tree are unchanged.

Run (``JAXBN_FAST=1`` for a shorter run)::

    python examples/convert_pretrained.py
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
STEPS = 150 if FAST else 400
BATCH = 32


class Net(nn.Module):
    """A small ConvNet written with flax's own BatchNorm (nothing jaxbn in it)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for features in (16, 32):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(5, name="head")(x.mean(axis=(1, 2)))


def train(apply, params, batch_stats, tx, x, y, steps, seed):
    """`steps` of softmax cross-entropy on random batches; returns the new params and batch_stats."""
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, xb, yb):
        def loss_fn(p):
            logits, updates = apply({"params": p, "batch_stats": batch_stats}, xb, train=True,
                                    mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(x), BATCH, replace=False)
        params, batch_stats, opt_state = step(params, batch_stats, opt_state, x[idx], y[idx])
    return params, batch_stats


def main() -> None:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    old, new = y < 5, y >= 5
    model = Net()
    variables = model.init(jax.random.key(0), x[:1], train=False)

    # 1. "Pretraining", elsewhere: flax's own layers on classes 0-4.
    params, batch_stats = train(model.apply, variables["params"], variables["batch_stats"], optax.adam(3e-3),
                                x[old], y[old], STEPS, seed=0)

    # 2. Converted and frozen, no edit of Net: a new head learns classes 5-9, the backbone stays as it is.
    finetune_apply = jaxbn.linen.freeze(jaxbn.linen.convert(model.apply))
    x_tr, x_te, y_tr, y_te = train_test_split(x[new], y[new] - 5, test_size=0.3, random_state=0)
    head = jax.tree.map(jnp.zeros_like, params["head"])
    only_head = {k: k == "head" for k in params}
    tx = optax.multi_transform({True: optax.adam(1e-2), False: optax.set_to_zero()}, only_head)
    tuned, tuned_stats = train(finetune_apply, {**params, "head": head}, batch_stats, tx, x_tr, y_tr, STEPS, seed=1)

    logits = jax.jit(lambda p, s, x: finetune_apply({"params": p, "batch_stats": s}, x, train=False))(
        tuned, tuned_stats, x_te)
    accuracy = float((np.asarray(logits).argmax(-1) == y_te).mean())
    same_stats = all(bool(jnp.array_equal(a, b)) for a, b in
                     zip(jax.tree.leaves(tuned_stats), jax.tree.leaves(batch_stats), strict=True))
    backbone = {k: v for k, v in params.items() if k != "head"}
    same_backbone = all(bool(jnp.array_equal(a, b)) for a, b in zip(
        jax.tree.leaves(backbone), jax.tree.leaves({k: v for k, v in tuned.items() if k != "head"}), strict=True))
    same_tree = jax.tree.structure({"params": tuned, "batch_stats": tuned_stats}) == jax.tree.structure(
        {"params": params, "batch_stats": batch_stats})
    print(f"fine-tuned head (classes 5-9), frozen converted backbone: test accuracy {accuracy:.4f}")
    print(f"running statistics unchanged by fine-tuning: {same_stats}")
    print(f"backbone parameters unchanged by fine-tuning: {same_backbone}")
    print(f"variable tree unchanged (flax's checkpoint layout): {same_tree}")


if __name__ == "__main__":
    main()
