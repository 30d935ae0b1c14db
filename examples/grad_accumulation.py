"""Gradient accumulation with batch norm: one running-stat update per optimizer step.

`optax.MultiSteps` splits each optimizer step into k micro-batches. With a
plain batch norm every micro-batch updates the running statistics, so the
momentum is applied k times per step and the running variance averages k
small-batch estimates (biased low: the spread between the micro-batch means
is lost). With jaxbn each layer pools its micro-batches' moments (Chan's
combination, exact) and the running statistics are updated once per step,
from the moments of the whole batch:

    model.apply(..., mutable=[jaxbn.linen.MOMENTS])          # per micro-batch
    jaxbn.linen.commit_moments(batch_stats, pools, apply=opt.has_updated(opt_state))

This example trains a small Linen MLP with k = 8 micro-batches of 8 and
compares, after every optimizer step, the first BatchNorm's running variance
with a float64 reference (one update with the moments of the 64 examples,
computed in numpy) for jaxbn's accumulation and for per-micro-batch updates.

Run (``JAXBN_FAST=1`` for fewer steps)::

    python examples/grad_accumulation.py
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn
import jaxbn.linen

FAST = os.environ.get("JAXBN_FAST") == "1"
K, MICRO = 8, 8  # micro-batches per optimizer step, examples per micro-batch
STEPS = 3 if FAST else 20
MOMENTUM = 0.9


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = nn.Dense(8)(x)
        h = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=MOMENTUM)(h)
        return nn.Dense(1)(nn.relu(h))


def main() -> None:
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(4, 1))

    # The functional API: pooled micro-batch moments are the whole batch's moments.
    x = (3.0 + 2.0 * rng.normal(size=(K * MICRO, 4))).astype(np.float32)
    parts = [jaxbn.moments(x[i * MICRO:(i + 1) * MICRO]) for i in range(K)]
    pooled, whole = jaxbn.combine_moments(*parts), jaxbn.moments(x)
    print(f"combine_moments of {K} micro-batches vs moments of the whole batch: "
          f"max |var diff| = {float(jnp.max(jnp.abs(pooled.var - whole.var))):.1e}, "
          f"counts {pooled.count.tolist()[0]:.0f} == {whole.count.tolist()[0]:.0f}")

    model = MLP()
    variables = model.init(jax.random.key(0), x[:MICRO], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    naive_stats = batch_stats
    opt = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=K)
    opt_state = opt.init(params)
    # Empty pools with the model's layers (count 0 pools nothing), from shapes alone.
    shapes = jax.eval_shape(lambda: model.apply(variables, x[:MICRO], train=True, mutable=[jaxbn.linen.MOMENTS]))
    pools = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1][jaxbn.linen.MOMENTS])

    @jax.jit
    def micro_step(params, batch_stats, pools, opt_state, x, y):
        def loss_fn(params):
            pred, upd = model.apply({"params": params, "batch_stats": batch_stats, jaxbn.linen.MOMENTS: pools}, x,
                                    train=True, mutable=[jaxbn.linen.MOMENTS])
            return jnp.mean((pred - y) ** 2), upd[jaxbn.linen.MOMENTS]

        (loss, pools), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        # the step boundary: one update from the pooled moments, only when MultiSteps updates the weights
        batch_stats, pools = jaxbn.linen.commit_moments(batch_stats, pools, apply=opt.has_updated(opt_state))
        return optax.apply_updates(params, updates), batch_stats, pools, opt_state, loss

    @jax.jit
    def naive_update(params, stats, x):
        """What plain training does under MultiSteps: one running-stat update per micro-batch."""
        _, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return upd["batch_stats"]

    ref_mean, ref_var = np.zeros(8), np.ones(8)  # float64 reference: one update per step, whole batch
    print(f"\n{K} micro-batches of {MICRO} per optimizer step, momentum {MOMENTUM}; first BatchNorm's running var,")
    print("max relative error against the float64 whole-batch update:\n")
    print("| step |  loss  | jaxbn accumulation | update per micro-batch |")
    print("| ---- | ------ | ------------------ | ---------------------- |")
    worst_acc, best_naive = 0.0, np.inf
    for step in range(1, STEPS + 1):
        x = (3.0 + 2.0 * rng.normal(size=(K * MICRO, 4))).astype(np.float32)
        y = (x @ w_true + 0.1 * rng.normal(size=(K * MICRO, 1))).astype(np.float32)
        dense = jax.tree.map(lambda a: np.asarray(a, np.float64), params["Dense_0"])  # fixed within the step
        h = x.astype(np.float64) @ dense["kernel"] + dense["bias"]
        ref_mean = MOMENTUM * ref_mean + (1 - MOMENTUM) * h.mean(0)
        ref_var = MOMENTUM * ref_var + (1 - MOMENTUM) * h.var(0)
        losses = []
        for i in range(K):
            sl = slice(i * MICRO, (i + 1) * MICRO)
            naive_stats = naive_update(params, naive_stats, x[sl])
            params, batch_stats, pools, opt_state, loss = micro_step(params, batch_stats, pools, opt_state,
                                                                     x[sl], y[sl])
            losses.append(float(loss))
        acc_err = float(np.max(np.abs(batch_stats["BatchNorm_0"]["var"] - ref_var) / ref_var))
        naive_err = float(np.max(np.abs(naive_stats["BatchNorm_0"]["var"] - ref_var) / ref_var))
        worst_acc, best_naive = max(worst_acc, acc_err), min(best_naive, naive_err)
        print(f"| {step:4d} | {np.mean(losses):6.3f} | {acc_err:18.1e} | {naive_err:22.1e} |")

    print(f"\nworst error with jaxbn accumulation: {worst_acc:.1e}; smallest with per-micro-batch updates: "
          f"{best_naive:.1e}")
    matches = worst_acc < 1e-5
    print(f"accumulated running statistics equal the whole-batch update (float64 reference): {matches}")
    if not matches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
