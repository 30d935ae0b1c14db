"""The jaxbn demo: a small ConvNet on real handwritten digits, with and without batch norm.

Trains the same ConvNet three times with optax (SGD with momentum, same seed,
same batches) on scikit-learn's `load_digits` (1,797 8x8 grey-scale digits,
shipped with scikit-learn, nothing to download):

* ``no BN``      -- conv layers with biases, no normalization;
* ``BatchNorm``  -- a `jaxbn.linen.BatchNorm` after every conv;
* ``renorm``     -- the same with batch renormalization (``renorm=True``).

It prints a summary table (final test accuracy, steps to reach the target test
accuracy, wall time), shows a tqdm progress bar, and writes ``demo.png`` (the
training curves) into ``$JAXBN_OUT`` or the current directory. Every number it
prints is measured by that run; seeds are fixed.

Run (a few minutes on 2 CPU cores; ``JAXBN_FAST=1`` for a < 1 minute smoke run)::

    python3 -m venv .venv && .venv/bin/pip install -e ".[examples]" && .venv/bin/python examples/demo.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxbn.linen

FAST = os.environ.get("JAXBN_FAST") == "1"
OUT = os.environ.get("JAXBN_OUT", ".")
STEPS = 100 if FAST else 800
EVAL_EVERY = 25 if FAST else 20
BATCH = 32
LR = 0.03
TARGET = 0.98  # test accuracy for the "steps to target" column
SEED = 0


class ConvNet(nn.Module):
    """conv(32) -> [BN] -> relu -> conv(64) -> [BN] -> relu -> pool -> conv(64) -> [BN] -> relu -> mean -> dense(10)."""

    norm: str = "none"  # "none" | "bn" | "renorm"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i, features in enumerate((32, 64, 64)):
            x = nn.Conv(features, (3, 3), use_bias=self.norm == "none")(x)
            if self.norm != "none":
                x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9,
                                          renorm=self.norm == "renorm")(x)
            x = nn.relu(x)
            if i == 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.mean(axis=(1, 2))
        return nn.Dense(10)(x)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as NHWC float32 in [0, 1]; a fixed stratified 80/20 split."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te


def train(norm: str, data: tuple[np.ndarray, ...], bar: tqdm) -> dict[str, Any]:
    """Trains one variant; returns its curves, final test accuracy and wall time."""
    x_tr, y_tr, x_te, y_te = data
    model = ConvNet(norm)
    variables = model.init(jax.random.key(SEED), jnp.asarray(x_tr[:1]), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    tx = optax.sgd(LR, momentum=0.9)
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates.get("batch_stats", batch_stats)

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def accuracy(params, batch_stats, x, y):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    rng = np.random.default_rng(SEED)  # the same batch order for every variant
    order = np.concatenate([rng.permutation(len(x_tr)) for _ in range(STEPS * BATCH // len(x_tr) + 1)])
    x_te_j, y_te_j = jnp.asarray(x_te), jnp.asarray(y_te)
    steps, accs, losses = [], [], []
    # Compile before the clock starts, so wall time is training time.
    train_step.lower(params, batch_stats, opt_state, x_tr[:BATCH], y_tr[:BATCH]).compile()
    accuracy.lower(params, batch_stats, x_te_j, y_te_j).compile()
    start = time.perf_counter()
    running = 0.0
    for step in range(1, STEPS + 1):
        idx = order[(step - 1) * BATCH: step * BATCH]
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, x_tr[idx], y_tr[idx])
        running += float(loss)
        bar.update(1)
        if step % EVAL_EVERY == 0:
            acc = float(accuracy(params, batch_stats, x_te_j, y_te_j))
            steps.append(step)
            accs.append(acc)
            losses.append(running / EVAL_EVERY)
            running = 0.0
            bar.set_postfix(model=norm, test_acc=f"{acc:.3f}")
    wall = time.perf_counter() - start
    reached = next((s for s, a in zip(steps, accs, strict=True) if a >= TARGET), None)
    return {"steps": steps, "acc": accs, "loss": losses, "final": accs[-1], "reached": reached, "wall": wall}


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    """Test accuracy and training loss against step, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for label, r in results.items():
        ax_acc.plot(r["steps"], r["acc"], label=label)
        ax_loss.plot(r["steps"], r["loss"], label=label)
    ax_acc.axhline(TARGET, color="grey", lw=0.8, ls="--")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="load_digits: test accuracy", ylim=(0, 1))
    ax_loss.set(xlabel="step", ylabel="train loss (mean over window)", title="training loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"ConvNet, SGD(lr={LR}, momentum=0.9), batch {BATCH}, {STEPS} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    data = load_data()
    print(f"load_digits: {len(data[0])} train / {len(data[2])} test images (8x8), jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; {STEPS} steps of batch {BATCH}{' (JAXBN_FAST=1)' if FAST else ''}")
    variants: dict[str, str] = {"no BN": "none", "BatchNorm": "bn", "renorm": "renorm"}
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=STEPS * len(variants), desc="training", unit="step", dynamic_ncols=True) as bar:
        for label, norm in variants.items():
            results[label] = train(norm, data, bar)

    fmt: Callable[[int | None], str] = lambda s: f"{s}" if s is not None else f"> {STEPS}"  # noqa: E731
    print()
    print(f"| model     | final test acc | steps to {TARGET:.0%} test acc | wall time |")
    print("| --------- | -------------- | -------------------- | --------- |")
    for label, r in results.items():
        print(f"| {label:<9} | {r['final']:>14.4f} | {fmt(r['reached']):>20} | {r['wall']:>7.1f} s |")
    os.makedirs(OUT, exist_ok=True)
    path = os.path.abspath(os.path.join(OUT, "demo.png"))
    plot(results, path)
    print(f"\nplot written to {path}")


if __name__ == "__main__":
    main()
