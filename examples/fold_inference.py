"""Folding batch norm into the previous conv for inference: same outputs, less work.

In inference mode a batch norm is a per-channel affine map, so it can be
merged into the Conv (or Dense) before it: ``kernel' = kernel * m``,
``bias' = (bias - mean) * m + bn_bias`` with ``m = scale / sqrt(var + eps)``.
This example trains a small Linen ConvNet (conv -> `jaxbn.linen.BatchNorm` ->
relu, three times) for a few steps on scikit-learn's digits, then

* folds one layer by hand with ``jaxbn.fold(kernel, bias, stats, scale, bn_bias)``;
* folds the whole model with ``jaxbn.interop.fold_linen(variables, pairs)``
  into the variables of the same network built without batch norms;
* checks that the folded network gives the same logits (to float32 rounding)
  and the same predictions, and times both networks under ``jax.jit``.

Run (``JAXBN_FAST=1`` for a shorter run)::

    python examples/fold_inference.py
"""

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jaxbn
import jaxbn.interop
import jaxbn.linen

FAST = os.environ.get("JAXBN_FAST") == "1"
STEPS = 30 if FAST else 300
REPEATS = 5 if FAST else 30
FEATURES = (32, 64, 64)
N_BENCH = 256 if FAST else 1797  # images per timed inference call


class ConvNet(nn.Module):
    with_bn: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for features in FEATURES:
            x = nn.Conv(features, (3, 3), use_bias=not self.with_bn)(x)
            if self.with_bn:
                x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def bench(fn, *args) -> float:
    """Median wall time of a compiled call, in milliseconds."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    digits = load_digits()
    x = jnp.asarray((digits.images / 16.0).astype(np.float32)[..., None])
    y = jnp.asarray(digits.target.astype(np.int32))

    model = ConvNet(with_bn=True)
    variables = model.init(jax.random.key(0), x[:1])
    tx = optax.adam(3e-3)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def train_step(variables, opt_state, xb, yb):
        def loss_fn(params):
            logits, upd = model.apply({**variables, "params": params}, xb, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd

        (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], updates), **upd}, opt_state

    rng = np.random.default_rng(0)
    for _ in range(STEPS):  # a little training, so the running statistics are real ones
        idx = rng.choice(len(x), 64, replace=False)
        variables, opt_state = train_step(variables, opt_state, x[idx], y[idx])

    # 1) One layer by hand: conv(kernel) then batch norm == conv(kernel') + bias'.
    p, s = variables["params"], variables["batch_stats"]
    stats = jaxbn.RunningStats(s["BatchNorm_0"]["mean"], s["BatchNorm_0"]["var"], jnp.zeros((), jnp.int32))
    kernel, bias = jaxbn.fold(p["Conv_0"]["kernel"], None, stats, p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"])
    conv = nn.Conv(FEATURES[0], (3, 3))
    z_folded = conv.apply({"params": {"kernel": kernel, "bias": bias}}, x[:256])
    z_conv = nn.Conv(FEATURES[0], (3, 3), use_bias=False).apply({"params": p["Conv_0"]}, x[:256])
    z_bn, _ = jaxbn.batch_norm(z_conv, stats, p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"], training=False)
    print(f"one layer, jaxbn.fold: max |conv+BN - folded conv| = {float(jnp.max(jnp.abs(z_bn - z_folded))):.2e}")

    # 2) The whole model: ConvNet(with_bn=True) -> ConvNet(with_bn=False) variables.
    pairs = [(f"Conv_{i}", f"BatchNorm_{i}") for i in range(len(FEATURES))]
    folded = jaxbn.interop.fold_linen(variables, pairs)
    plain = ConvNet(with_bn=False)
    run_bn = jax.jit(lambda v, x: model.apply(v, x))
    run_folded = jax.jit(lambda v, x: plain.apply(v, x))
    logits_bn, logits_folded = run_bn(variables, x), run_folded(folded, x)
    diff = float(jnp.max(jnp.abs(logits_bn - logits_folded)))
    same = float(jnp.mean(jnp.argmax(logits_bn, -1) == jnp.argmax(logits_folded, -1)))
    scale = float(jnp.max(jnp.abs(logits_bn)))
    print(f"whole model, jaxbn.interop.fold_linen: max |logits diff| = {diff:.2e} (logits up to {scale:.1f}), "
          f"same prediction on {same:.2%} of {len(x)} images")
    assert diff <= 1e-4 * max(1.0, scale) and same == 1.0

    xs = x[:N_BENCH]
    t_bn, t_folded = bench(run_bn, variables, xs), bench(run_folded, folded, xs)
    n_params = sum(a.size for a in jax.tree.leaves(variables))
    n_folded = sum(a.size for a in jax.tree.leaves(folded))
    print()
    head = f"inference on {N_BENCH} images (jit, {jax.devices()[0].platform})"
    print(f"| {head:<36} | time (median) | variables |")
    print(f"| {'-' * 36} | ------------- | --------- |")
    print(f"| {'conv -> BatchNorm -> relu (x3)':<36} | {t_bn:>10.2f} ms | {n_params:>9} |")
    print(f"| {'folded conv -> relu (x3)':<36} | {t_folded:>10.2f} ms | {n_folded:>9} |")
    print(f"\nspeedup from folding: {t_bn / t_folded:.2f}x (measured here; the gain depends on the backend)")


if __name__ == "__main__":
    main()
