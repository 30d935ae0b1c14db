"""Equinox: `jaxbn.equinox.BatchNorm` next to `eqx.nn.BatchNorm` in the same ConvNet.

Trains one small ConvNet (two 3x3 convs, each followed by batch norm, "batch"
mode, momentum 0.9) twice on scikit-learn's digits (8x8
images, shipped with scikit-learn): once with `eqx.nn.BatchNorm`, once with
`jaxbn.equinox.BatchNorm` (swapping the class is the whole change), with the
same seed and batches. Training is the same for both (batch statistics); the
test accuracy in inference mode (`eqx.nn.inference_mode`, running statistics)
is printed as training goes. Then two equinox faults that jaxbn fixes, side
by side:

* inference before any training step, mode "ema" (equinox#955): equinox's
  running statistics start as `jnp.empty` and it divides by about sqrt(eps);
  jaxbn's start at mean 0, var 1 (the identity);
* "batch" mode's inference variance (one layer, equinox's default momentum
  0.99, 10 steps on data of variance 9): equinox divides the running
  variance, which starts at 1, by `1 - 0.99**k` and so adds
  `0.99**k / (1 - 0.99**k)` to it (+9.5 after 10 steps); jaxbn uses the
  EMA of the batch statistics as it is (flax's and PyTorch's rule).

Run (``JAXBN_FAST=1`` for a short run)::

    python examples/equinox_example.py
"""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxbn.equinox

FAST = os.environ.get("JAXBN_FAST") == "1"
STEPS = 60 if FAST else 400
EVAL_AT = (20, 60) if FAST else (20, 50, 100, 200, 400)
BATCH = 32
MOMENTUM = 0.9  # for the training runs; the inference-variance demo uses equinox's default 0.99


class ConvNet(eqx.Module):
    """conv -> BN -> relu, twice, global mean pooling, linear classifier; on ONE example (1, 8, 8)."""

    conv1: eqx.nn.Conv2d
    bn1: eqx.Module
    conv2: eqx.nn.Conv2d
    bn2: eqx.Module
    head: eqx.nn.Linear

    def __init__(self, batch_norm: type, key: jax.Array, mode: str = "batch"):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, use_bias=False, key=k1)
        self.bn1 = batch_norm(16, axis_name="batch", momentum=MOMENTUM, mode=mode)
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, padding=1, use_bias=False, key=k2)
        self.bn2 = batch_norm(32, axis_name="batch", momentum=MOMENTUM, mode=mode)
        self.head = eqx.nn.Linear(32, 10, key=k3)

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        x, state = self.bn1(self.conv1(x), state)
        x, state = self.bn2(self.conv2(jax.nn.relu(x)), state)
        return self.head(jax.nn.relu(x).mean(axis=(1, 2))), state


def batched(model: ConvNet):
    """The per-example model over a batch: the batch norms reduce over the vmap axis "batch"."""
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


OPTIMIZER = optax.adam(optax.cosine_decay_schedule(3e-2, STEPS))


@eqx.filter_jit
def train_step(model, state, opt_state, x, y):
    def loss_fn(model, state):
        logits, state = batched(model)(x, state)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), state, opt_state, loss


@eqx.filter_jit
def accuracy(model, state, x, y):
    logits, _ = batched(eqx.nn.inference_mode(model))(x, state)
    return jnp.mean(jnp.argmax(logits, -1) == y)


def bn1_output(model, state, x, inference):
    """The first batch norm's input (conv1's output) and output on x."""
    h = jax.vmap(model.conv1)(x)
    f = jax.vmap(lambda e, s: model.bn1(e, s, inference=inference), axis_name="batch",
                 in_axes=(0, None), out_axes=(0, None))
    return h, f(h, state)[0]


def main() -> None:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8): channels first, as equinox
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target.astype(np.int32), test_size=0.2, random_state=0)
    key = jax.random.key(0)

    # ---- training: the same network, seed and batches with each class
    layers = {"eqx.nn.BatchNorm": eqx.nn.BatchNorm, "jaxbn.equinox.BatchNorm": jaxbn.equinox.BatchNorm}
    runs = {}
    for name, cls in layers.items():
        model, state = eqx.nn.make_with_state(ConvNet)(cls, key)
        opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array))
        rng = np.random.default_rng(0)
        accs = {}
        for step in range(1, STEPS + 1):
            idx = rng.choice(len(x_tr), BATCH, replace=False)
            model, state, opt_state, loss = train_step(model, state, opt_state, x_tr[idx], y_tr[idx])
            if step in EVAL_AT:
                accs[step] = float(accuracy(model, state, x_te, y_te))
        runs[name] = accs
        print(f"{name:24s} trained {STEPS} steps, final loss {float(loss):.4f}")

    print("\ntest accuracy in inference mode (running statistics), by training step")
    print(f"{'step':>6}  {'eqx.nn.BatchNorm':>17}  {'jaxbn.equinox':>14}")
    for step in EVAL_AT:
        print(f"{step:>6}  {runs['eqx.nn.BatchNorm'][step]:>17.4f}  {runs['jaxbn.equinox.BatchNorm'][step]:>14.4f}")

    # ---- fault 1: inference before any training step ("ema" mode, equinox#955)
    print("\ninference before any training step (mode='ema'): std of bn1's output / std of its input")
    sample = x_te[:64]
    for name, cls in layers.items():
        model, state = eqx.nn.make_with_state(ConvNet)(cls, key, mode="ema")
        h, y = bn1_output(model, state, sample, inference=True)
        print(f"  {name:24s} {float(jnp.std(y) / jnp.std(h)):10.2f}")

    # ---- fault 2: "batch" mode inference variance after 10 steps at momentum 0.99 (one layer)
    print("\none BatchNorm(2, mode='batch', momentum=0.99), 10 training steps on batches of N(1, 3^2):")
    data = np.random.default_rng(1).normal(1.0, 3.0, size=(11, 32, 2)).astype(np.float32)
    batch_vars = data[:10].astype(np.float64).var(axis=1)
    ema = 1.0  # the running variance starts at 1: new = 0.99 * old + 0.01 * batch var
    for v in batch_vars[:, 0]:
        ema = 0.99 * ema + 0.01 * v
    print(f"  mean batch variance {batch_vars[:, 0].mean():.4f}; float64 EMA of the batch variances {ema:.4f}")
    for name, cls in layers.items():
        layer, state = eqx.nn.make_with_state(cls)(2, "batch", mode="batch", momentum=0.99)
        step = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        for batch in data[:10]:
            _, state = step(batch, state)
        y, _ = jax.vmap(eqx.nn.inference_mode(layer), axis_name="batch", in_axes=(0, None),
                        out_axes=(0, None))(data[10], state)
        implied = float(jnp.var(data[10][:, 0]) / jnp.var(y[:, 0])) - layer.eps
        print(f"  {name:24s} variance used in inference {implied:8.4f}")
    assert runs["jaxbn.equinox.BatchNorm"][STEPS] > 0.5


if __name__ == "__main__":
    main()
