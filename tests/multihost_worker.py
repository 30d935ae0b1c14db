"""One process of the 2-process sync-BN test (started by tests/test_multihost.py).

Usage: python tests/multihost_worker.py PROCESS_ID PORT

Each process has 2 CPU devices (XLA_FLAGS set by the parent), joins the run
with gloo CPU collectives, and normalizes its half of one global batch with
statistics synchronized over all 4 devices, through `jax.pmap` and through
`jax.shard_map` over a global mesh. Devices hold different numbers of valid
entries (one none). Every process computes the float64 single-device
reference on the whole batch itself, checks its own rows, the running stats
and the parameter gradients, prints one ``RESULT {json}`` line and exits 0.
"""

from __future__ import annotations

import json
import os
import sys

NUM_PROCESSES, LOCAL_DEVICES, B, C = 2, 2, 5, 3
VALID = [5, 0, 2, 4]  # valid entries per global device: unequal, device 1 empty
MOMENTUM = 0.9
TOL = 5e-5


def main(process_id: int, port: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=NUM_PROCESSES, process_id=process_id, initialization_timeout=60
    )
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbn

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests import reference as ref

    n_dev = jax.device_count()
    assert n_dev == NUM_PROCESSES * LOCAL_DEVICES and jax.local_device_count() == LOCAL_DEVICES, jax.devices()

    # The same global batch in every process (same seed); each process feeds only its own devices' rows.
    rng = np.random.default_rng(0)
    x = (10.0 + 2.0 * rng.normal(size=(n_dev, B, C))).astype(np.float32)
    dy = rng.normal(size=(n_dev, B, C)).astype(np.float32)
    mask = np.arange(B)[None, :, None] < np.array(VALID)[:, None, None]
    scale = (1.0 + 0.5 * rng.normal(size=C)).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    mine = slice(process_id * LOCAL_DEVICES, (process_id + 1) * LOCAL_DEVICES)

    xf, mf, dyf = x.reshape(-1, C), mask.reshape(-1, 1), dy.reshape(-1, C)
    mean, var, n = ref.moments(xf, mask=mf)
    want = {
        "y": ref.normalize(xf, mean, var, scale, bias).reshape(n_dev, B, C)[mine],
        "dx": ref.bn_train_grads(xf, dyf, scale, mask=mf)[0].reshape(n_dev, B, C)[mine],
    }
    want["mean"], want["var"], _ = ref.update(np.zeros(C), np.ones(C), 0, mean, var, n, momentum=MOMENTUM)
    _, want["dscale"], want["dbias"] = ref.bn_train_grads(xf, dyf, scale, mask=mf)

    def local_step(x, m, dy, s, b, axis_name, strategy):
        def loss(x, s, b):
            y, new = jaxbn.batch_norm(
                x, jaxbn.init_stats(C), s, b, training=True, axis_name=axis_name, mask=m, momentum=MOMENTUM,
                strategy=strategy,
            )
            return jnp.sum(y * dy), (y, new)

        (_, (y, new)), (dx, ds, db) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, s, b)
        return {"y": y, "dx": dx, "mean": new.mean, "var": new.var, "dscale": ds, "dbias": db}

    errors = {}

    def record(name, got):
        err = {}
        for k, w in want.items():
            g = np.asarray(got[k], np.float64)
            assert np.all(np.isfinite(g)), (name, k)
            err[k] = float(np.max(np.abs(g - w) / (1.0 + np.abs(w))))
        errors[name] = err

    # 1) pmap over the local devices; the collectives span both processes.
    for strategy in ("gather", "psum"):

        def pstep(x, m, dy, s, b, strategy=strategy):
            out = local_step(x, m, dy, s, b, "i", strategy)
            # Per-device parameter gradients, summed over all 4 devices for the check.
            out["dscale"], out["dbias"] = jax.lax.psum((out["dscale"], out["dbias"]), "i")
            return out

        got = jax.pmap(pstep, axis_name="i", in_axes=(0, 0, 0, None, None))(x[mine], mask[mine], dy[mine], scale, bias)
        got = {k: np.asarray(v) for k, v in got.items()}
        record(f"pmap {strategy}", {**got, **{k: got[k][0] for k in ("mean", "var", "dscale", "dbias")}})

    # 2) shard_map inside jit over a global 4-device mesh.
    mesh = jax.make_mesh((n_dev,), ("data",))
    d, r = P("data"), P()
    local_rows = slice(process_id * LOCAL_DEVICES * B, (process_id + 1) * LOCAL_DEVICES * B)

    def global_array(a, spec):
        a = a.reshape(-1, a.shape[-1])
        shape = a.shape
        local = a[local_rows] if spec == d else a
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, shape)

    args = [global_array(a, d) for a in (x, mask, dy)] + [
        jax.make_array_from_process_local_data(NamedSharding(mesh, r), a) for a in (scale, bias)
    ]
    for strategy in ("auto", "psum"):
        f = jax.jit(
            jax.shard_map(
                lambda x, m, dy, s, b, strategy=strategy: local_step(x, m, dy, s, b, "data", strategy),
                mesh=mesh,
                in_specs=(d, d, d, r, r),
                out_specs={"y": d, "dx": d, "mean": r, "var": r, "dscale": r, "dbias": r},
            )
        )
        out = f(*args)

        def rows(a):
            shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start)
            return np.concatenate([np.asarray(s.data) for s in shards]).reshape(LOCAL_DEVICES, B, C)

        got = {k: rows(out[k]) for k in ("y", "dx")}
        got.update({k: np.asarray(out[k].addressable_data(0)) for k in ("mean", "var", "dscale", "dbias")})
        record(f"shard_map {strategy}", got)

    worst = max(v for e in errors.values() for v in e.values())
    print("RESULT " + json.dumps({"process": process_id, "devices": n_dev, "worst": worst, "errors": errors}))
    sys.stdout.flush()
    assert worst < TOL, errors
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
