"""Sync-BN on 8 simulated CPU devices: tiny per-device batches, global statistics.

Trains one small network (dense -> batch norm -> relu -> dense) on
scikit-learn's digits with a global batch of 32 split over 8 devices, i.e.
4 examples per device, five ways from the same initialization and the same
batches:

* ``big batch``  -- one device sees all 32 examples (the reference);
* ``pmap sync``  -- `jax.pmap` with ``axis_name="batch"`` passed to `jaxbn.batch_norm`;
* ``shard_map``  -- `jax.shard_map` over a 1-D mesh, ``axis_name="data"``;
* ``jit sharded``-- plain `jax.jit` on a batch placed with ``NamedSharding(mesh, P("data"))``:
  no axis name at all, XLA computes the global statistics across the shards;
* ``pmap local`` -- `jax.pmap` *without* ``axis_name``: every device normalizes
  with the moments of its own 4 examples (what you get when you forget sync-BN).

The mesh has an *Explicit* axis (``axis_types=(AxisType.Explicit,)``, the default of
`jax.make_mesh` since JAX 0.9), so the shardings are part of the types and the
same code runs on older and newer JAX alike. Under Explicit axes an operation
whose output sharding JAX cannot infer raises ``ShardingTypeError``: optax's
integer-label cross entropy (a gather along the sharded batch axis) is one, so
the loss here takes one-hot labels, which is elementwise and shards like the
batch.

All variants average gradients across devices. The table shows that the
three synchronized variants follow the big-batch run to float32 rounding,
while unsynchronized BN drifts away (and its running statistics, estimated
from 4 examples at a time, are worse). A plot of the training loss and of the
distance to the big-batch parameters goes to ``$JAXBN_OUT/sync_bn.png``.

Run (``JAXBN_FAST=1`` for a shorter run)::

    python examples/sync_bn.py
"""

import os
import re

# 8 fake CPU devices; must happen before jax is imported. Replaces any existing device-count flag.
os.environ["XLA_FLAGS"] = (
    re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    + " --xla_force_host_platform_device_count=8"
).strip()

import time  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import jaxbn  # noqa: E402

FAST = os.environ.get("JAXBN_FAST") == "1"
OUT = os.environ.get("JAXBN_OUT", ".")
N_DEV = 8
PER_DEVICE = 4
BATCH = N_DEV * PER_DEVICE
STEPS = 40 if FAST else 400
HIDDEN = 64
tx = optax.sgd(0.05, momentum=0.9)


def init(key: jax.Array) -> tuple[dict, jaxbn.RunningStats]:
    k1, k2 = jax.random.split(key)
    params = {
        "w1": jax.random.normal(k1, (64, HIDDEN)) * np.sqrt(2 / 64),  # no bias: BN's bias replaces it
        "scale": jnp.ones(HIDDEN), "bias": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, 10)) * np.sqrt(1 / HIDDEN), "b2": jnp.zeros(10),
    }
    return params, jaxbn.init_stats(HIDDEN)


def forward(params, stats, x, *, training, axis_name=None):
    h = x @ params["w1"]
    h, stats = jaxbn.batch_norm(h, stats, params["scale"], params["bias"], training=training,
                                momentum=0.9, axis_name=axis_name)
    return jax.nn.relu(h) @ params["w2"] + params["b2"], stats


def loss_fn(params, stats, x, y, axis_name=None):
    logits, stats = forward(params, stats, x, training=True, axis_name=axis_name)
    # One-hot labels, not softmax_cross_entropy_with_integer_labels: the latter gathers along the
    # batch axis, which JAX refuses on a batch sharded over an Explicit mesh axis (ShardingTypeError).
    return optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, 10)).mean(), stats


def step_on_shard(params, stats, opt_state, x, y, *, bn_axis, grad_axis):
    """One device's step: BN synchronized over `bn_axis` (or not), gradients averaged over `grad_axis`."""
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, bn_axis)
    grads, loss = jax.lax.pmean((grads, loss), grad_axis)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss


def step_shard_map(params, stats, opt_state, x, y):
    """One device's step under shard_map: differentiate the *global* mean loss.

    Under shard_map (with its default check_vma=True) the gradient of a replicated
    parameter is already summed over the mesh axis, so no extra `pmean` of the grads.
    """

    def global_loss(params, stats):
        loss, stats = loss_fn(params, stats, x, y, "data")
        return jax.lax.pmean(loss, "data"), stats

    (loss, stats), grads = jax.value_and_grad(global_loss, has_aux=True)(params, stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss


def step_global(params, stats, opt_state, x, y):
    """Whole-batch step: used on one device and, unchanged, under jit sharding."""
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss


def main() -> None:
    devices = jax.devices()
    assert len(devices) == N_DEV, f"expected {N_DEV} CPU devices, got {devices}"
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target.astype(np.int32), test_size=0.2, random_state=0)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(x_tr)) for _ in range(STEPS * BATCH // len(x_tr) + 1)])
    batches = [(x_tr[order[i * BATCH:(i + 1) * BATCH]], y_tr[order[i * BATCH:(i + 1) * BATCH]]) for i in range(STEPS)]

    params0, stats0 = init(jax.random.key(0))
    state0 = (params0, stats0, tx.init(params0))
    # Explicit axis type: make_mesh's default since JAX 0.9, spelled out so every JAX version runs the same program.
    mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Explicit,))
    replicate = lambda t: jax.tree.map(lambda a: np.broadcast_to(a, (N_DEV, *np.shape(a))), t)  # noqa: E731
    split = lambda a: a.reshape(N_DEV, PER_DEVICE, *a.shape[1:])  # noqa: E731

    # Each runner: state, (x, y) global batch -> state, loss; plus `unwrap` back to one copy of the state.
    runners = {}
    runners["big batch"] = (jax.jit(step_global),
                            lambda s: s, lambda b: b, lambda s: s)
    pmap_sync = jax.pmap(partial(step_on_shard, bn_axis="batch", grad_axis="batch"), axis_name="batch")
    runners["pmap sync"] = (pmap_sync, replicate, lambda b: tuple(map(split, b)),
                            lambda s: jax.tree.map(lambda a: a[0], s))
    smap = jax.jit(jax.shard_map(step_shard_map, mesh=mesh,
                                 in_specs=(P(), P(), P(), P("data"), P("data")), out_specs=(P(), P(), P(), P())))
    shard = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    runners["shard_map"] = (smap, lambda s: jax.device_put(s, repl), lambda b: jax.device_put(b, shard), lambda s: s)
    runners["jit sharded"] = (jax.jit(step_global), lambda s: jax.device_put(s, repl),
                              lambda b: jax.device_put(b, shard), lambda s: s)
    pmap_local = jax.pmap(partial(step_on_shard, bn_axis=None, grad_axis="batch"), axis_name="batch")
    runners["pmap local"] = (pmap_local, replicate, lambda b: tuple(map(split, b)),
                             lambda s: jax.tree.map(lambda a: a[0], s))  # device 0's running stats

    @jax.jit
    def accuracy(params, stats):
        logits, _ = forward(params, stats, x_te, training=False)
        return jnp.mean(jnp.argmax(logits, -1) == y_te)

    curves, finals = {}, {}
    print(f"{N_DEV} CPU devices, global batch {BATCH} = {N_DEV} x {PER_DEVICE}, {STEPS} steps")
    for name, (step, place, feed, unwrap) in runners.items():
        state = place(state0)
        losses, params_seen = [], []
        start = time.perf_counter()
        for xb, yb in batches:
            *state, loss = step(*state, *feed((xb, yb)))
            losses.append(float(np.mean(loss)))
            params_seen.append(jax.device_get(unwrap(state)[0]))
        wall = time.perf_counter() - start
        params, stats, _ = jax.device_get(unwrap(state))
        curves[name] = (losses, params_seen)
        finals[name] = (losses[-1], float(accuracy(params, stats)), stats, wall)

    def dist(a, b):
        return max(float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    ref_params = curves["big batch"][1]
    ref_stats = finals["big batch"][2]
    print()
    print("| variant     | final loss | test acc | max |params - big batch| | max |running var - big batch| "
          "| time (incl. compile) |")
    print("| ----------- | ---------- | -------- | ------------------------ | --------------------------- "
          "| -------------------- |")
    for name, (loss, acc, stats, wall) in finals.items():
        dp = dist(curves[name][1][-1], ref_params[-1])
        dv = float(np.max(np.abs(stats.var - ref_stats.var)))
        print(f"| {name:<11} | {loss:>10.4f} | {acc:>8.4f} | {dp:>24.2e} | {dv:>27.2e} | {wall:>18.1f} s |")

    sync_err = max(dist(curves[n][1][-1], ref_params[-1]) for n in ("pmap sync", "shard_map", "jit sharded"))
    local_err = dist(curves["pmap local"][1][-1], ref_params[-1])
    assert sync_err < 1e-3 < local_err, (sync_err, local_err)
    print(f"\nsync-BN matches the big batch to {sync_err:.1e}; unsynchronized BN is {local_err:.1e} away.")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, (losses, params_seen) in curves.items():
        style = {"lw": 3, "alpha": 0.4} if name == "big batch" else {"lw": 1.2}
        ax1.plot(losses, label=name, **style)
        if name != "big batch":
            d = [max(dist(p, r), 1e-9) for p, r in zip(params_seen, ref_params, strict=True)]
            ax2.plot(d, label=name)
    ax1.set(xlabel="step", ylabel="training loss", yscale="log", title=f"{N_DEV} devices x {PER_DEVICE} examples")
    ax2.set(xlabel="step", ylabel="max |params - big-batch params|", yscale="log", title="distance to the big batch")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(OUT, exist_ok=True)
    path = os.path.abspath(os.path.join(OUT, "sync_bn.png"))
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
