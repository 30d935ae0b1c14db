"""Multi-host sync-BN: two processes on localhost, 2 CPU devices each, one global batch.

This is the launch you would do on a real cluster (one process per host),
run on one machine: the script starts itself twice as child processes
(``process_id`` 0 and 1) with a free coordinator port; each child gets 2 fake
CPU devices, turns on gloo CPU collectives and calls
``jax.distributed.initialize``. Together they form 4 devices; a global batch of
16 digits is split 4 per device, each process loading only its own half.

Each child trains the same network (dense -> `jaxbn.batch_norm` -> relu -> dense)
a few SGD steps twice, with batch-norm statistics synchronized across both
processes:

* with `jax.pmap` and ``axis_name="batch"`` (collectives span every process's devices);
* with `jax.jit` on a global array built by `jax.make_array_from_process_local_data`
  over a 4-device mesh (no axis name: XLA computes the global statistics). The mesh
  axis is Explicit (`jax.make_mesh`'s default since JAX 0.9, spelled out here), so
  the loss takes one-hot labels: optax's integer-label cross entropy gathers along
  the sharded batch axis, which JAX refuses there (``ShardingTypeError``).

and compares both with the same steps run on one device over the whole
global batch. Process 0 prints the result. The parent kills both children and
fails if either fails or they run past the timeout.

Run::

    python examples/multihost.py
"""

import os
import re
import socket
import subprocess
import sys
import time

FAST = os.environ.get("JAXBN_FAST") == "1"
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
PER_DEVICE = 4
STEPS = 5 if FAST else 20
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch() -> int:
    """Parent: start the children, wait with a timeout, kill them all on any failure."""
    port = free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
                        + f" --xla_force_host_platform_device_count={LOCAL_DEVICES}").strip()
    procs = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(i), str(port)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(NUM_PROCESSES)
    ]
    print(f"launched {NUM_PROCESSES} processes (pids {[p.pid for p in procs]}), coordinator 127.0.0.1:{port}")
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    while any(p.poll() is None for p in procs):
        bad = [p for p in procs if p.poll() not in (None, 0)]
        if bad:
            failed = f"process {procs.index(bad[0])} exited with {bad[0].returncode}"
            break
        if time.monotonic() > deadline:
            failed = f"timed out after {TIMEOUT_S} s"
            break
        time.sleep(0.2)
    if failed is None and any(p.returncode != 0 for p in procs):
        failed = "a process failed: " + ", ".join(f"{i}: {p.returncode}" for i, p in enumerate(procs))
    for p in procs:  # only our own children, by handle
        if p.poll() is None:
            p.kill()
    outputs = [p.communicate()[0] for p in procs]
    if failed:
        for i, out in enumerate(outputs):
            print(f"----- process {i} output -----\n{out}")
        print(f"FAILED: {failed}")
        return 1
    print(outputs[0], end="")
    return 0


def worker(process_id: int, port: int) -> None:
    """Child: join the distributed run, train with synchronized BN, compare with one device."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=NUM_PROCESSES, process_id=process_id,
                               initialization_timeout=120)

    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P
    from sklearn.datasets import load_digits

    import jaxbn

    n_dev = jax.device_count()
    assert n_dev == NUM_PROCESSES * LOCAL_DEVICES and jax.local_device_count() == LOCAL_DEVICES
    global_batch = n_dev * PER_DEVICE
    local_batch = LOCAL_DEVICES * PER_DEVICE
    tx = optax.sgd(0.05, momentum=0.9)

    def forward(params, stats, x, axis_name=None):
        h, stats = jaxbn.batch_norm(x @ params["w1"], stats, params["scale"], params["bias"], training=True,
                                    momentum=0.9, axis_name=axis_name)
        return jax.nn.relu(h) @ params["w2"] + params["b2"], stats

    def loss_fn(params, stats, x, y, axis_name=None):
        logits, stats = forward(params, stats, x, axis_name)
        # One-hot labels: elementwise, so they shard like the batch on an Explicit mesh axis.
        return optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, 10)).mean(), stats

    def step_pmap(params, stats, opt_state, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, "batch")
        grads, loss = jax.lax.pmean((grads, loss), "batch")
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    def step_global(params, stats, opt_state, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    # Every process builds the same initial state and the same batch order; each loads its own rows.
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (64, 32)) * 0.18, "scale": jnp.ones(32), "bias": jnp.zeros(32),
              "w2": jax.random.normal(k2, (32, 10)) * 0.18, "b2": jnp.zeros(10)}
    state0 = jax.device_get((params, jaxbn.init_stats(32), tx.init(params)))
    digits = load_digits()
    x_all, y_all = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x_all))[: STEPS * global_batch].reshape(STEPS, global_batch)
    mine = slice(process_id * local_batch, (process_id + 1) * local_batch)  # this process's rows

    # 1) pmap: leading axis = local devices; psum inside batch_norm spans all processes.
    p_step = jax.pmap(step_pmap, axis_name="batch")
    state = jax.tree.map(lambda a: np.broadcast_to(a, (LOCAL_DEVICES, *np.shape(a))), state0)
    for idx in order:
        xb, yb = x_all[idx][mine], y_all[idx][mine]
        *state, loss_pmap = p_step(*state, xb.reshape(LOCAL_DEVICES, PER_DEVICE, 64),
                                   yb.reshape(LOCAL_DEVICES, PER_DEVICE))
    pmap_params, pmap_stats, _ = jax.tree.map(lambda a: np.asarray(a[0]), state)

    # 2) jit over a global 4-device mesh: each process contributes its local rows.
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(AxisType.Explicit,))
    data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    j_step = jax.jit(step_global, out_shardings=replicated)
    state = jax.tree.map(lambda a: jax.make_array_from_process_local_data(replicated, np.asarray(a)), state0)
    for idx in order:
        xb = jax.make_array_from_process_local_data(data_sharding, x_all[idx][mine], (global_batch, 64))
        yb = jax.make_array_from_process_local_data(data_sharding, y_all[idx][mine], (global_batch,))
        *state, loss_jit = j_step(*state, xb, yb)
    jit_params, jit_stats, _ = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state)

    # Reference: one local device, the whole global batch.
    local_dev = jax.local_devices()[0]
    r_step = jax.jit(step_global)
    state = jax.device_put(state0, local_dev)
    for idx in order:
        *state, loss_ref = r_step(*state, jax.device_put(x_all[idx], local_dev), jax.device_put(y_all[idx], local_dev))
    ref_params, ref_stats, _ = jax.device_get(state)

    def dist(a, b):
        return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
                   for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    d_pmap = max(dist(pmap_params, ref_params), dist(pmap_stats, ref_stats))
    d_jit = max(dist(jit_params, ref_params), dist(jit_stats, ref_stats))
    if process_id == 0:
        print(f"process {process_id}: {jax.process_count()} processes, {n_dev} devices "
              f"({jax.local_device_count()} local), global batch {global_batch} = {n_dev} x {PER_DEVICE}, "
              f"{STEPS} steps")
        print("| run                        | final loss | max |params, stats - one device| |")
        print("| -------------------------- | ---------- | ------------------------------ |")
        print(f"| pmap, axis_name='batch'    | {float(np.mean(loss_pmap)):>10.4f} | {d_pmap:>30.2e} |")
        print(f"| jit, 4-device global mesh  | {float(loss_jit):>10.4f} | {d_jit:>30.2e} |")
        print(f"| one device, whole batch    | {float(loss_ref):>10.4f} | {0.0:>30.2e} |")
    assert d_pmap < 1e-4 and d_jit < 1e-4, (d_pmap, d_jit)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(launch())
