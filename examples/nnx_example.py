"""Flax NNX: `jaxbn.nnx.BatchNorm` in a small ConvNet trained with `nnx.Optimizer`.

Shows the NNX workflow with jaxbn's drop-in module: build the model with
``rngs``, train it with ``nnx.Optimizer`` in an ``nnx.jit`` step after
``model.train()`` (batch statistics, running stats updated in place), then
``model.eval()`` for inference with the running statistics. Also shows
``jaxbn.nnx.recompute_batch_stats`` ("precise BN": the running stats
replaced by the population statistics of the training set). Data: scikit-
learn's digits (8x8 images, shipped with scikit-learn).

Run (``JAXBN_FAST=1`` for a shorter run)::

    python examples/nnx_example.py
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxbn.nnx

FAST = os.environ.get("JAXBN_FAST") == "1"
STEPS = 60 if FAST else 600
BATCH = 32


class ConvNet(nnx.Module):
    """conv -> BN -> relu, twice, then global mean pooling and a linear classifier."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = jaxbn.nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = jaxbn.nnx.BatchNorm(32, momentum=0.9, rngs=rngs)  # renorm=True for Batch Renormalization
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


@nnx.jit
def train_step(model: ConvNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)  # BatchNorm's running stats update in place
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model: ConvNet, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def main() -> None:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target.astype(np.int32), test_size=0.2, random_state=0)

    model = ConvNet(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(0)

    model.train()  # every jaxbn.nnx.BatchNorm: use_running_average=False
    for step in range(1, STEPS + 1):
        idx = rng.choice(len(x_tr), BATCH, replace=False)
        loss = train_step(model, optimizer, x_tr[idx], y_tr[idx])
        if step % (STEPS // 4) == 0:
            print(f"step {step:4d}  loss {float(loss):.4f}")
    print(f"bn2 running mean[:3] {np.round(np.asarray(model.bn2.mean[...][:3]), 3)}, "
          f"var[:3] {np.round(np.asarray(model.bn2.var[...][:3]), 3)}")

    model.eval()  # use_running_average=True: inference with the running statistics
    acc_ema = float(accuracy(model, x_te, y_te))
    print(f"test accuracy, running (EMA) statistics:      {acc_ema:.4f}")

    # Precise BN: replace the EMA by the training set's population statistics (in place).
    jaxbn.nnx.recompute_batch_stats(model, [x_tr[i:i + 256] for i in range(0, len(x_tr), 256)])
    acc_precise = float(accuracy(model, x_te, y_te))
    print(f"test accuracy, recomputed (precise) statistics: {acc_precise:.4f}")
    assert acc_ema > 0.5 and acc_precise > 0.5


if __name__ == "__main__":
    main()
