"""Collectives of synchronized batch-norm steps, and running a benchmark part on simulated devices.

`sync_bn_table` counts, for one synchronized batch-norm layer (a jitted
forward + backward step under `jax.shard_map`), the collectives of jaxbn's
strategies next to `flax.linen.BatchNorm`'s; `layer_collectives` does the
same for every layer-benchmark implementation. The device count is fixed when
JAX starts, so other counts run in a child Python (`in_subprocess`, with
`cpu_devices_env`). The counting itself is `benchmarks.hlo`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import hlo
from benchmarks.layers import IMPLEMENTATIONS, programs

#: A JSON value, as the child processes print them.
JSON: TypeAlias = dict[str, object] | list[object]

#: Implementations of the sync-BN table: jaxbn's strategies and flax.linen.BatchNorm.
IMPLS = ("jaxbn auto", "jaxbn gather", "jaxbn psum", "flax fast_var=True", "flax fast_var=False")


def cpu_devices_env(devices: int) -> dict[str, str]:
    """This process's environment for a child Python with `devices` simulated CPU devices."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def in_subprocess(args: Sequence[str], devices: int, timeout: float = 600) -> JSON:
    """Runs `python -m benchmarks *args` with `devices` CPU devices; returns the JSON of its last stdout line.

    Raises:
      RuntimeError: the child failed (its stderr's tail is in the message).
    """
    cmd = [sys.executable, "-m", "benchmarks", *args]
    res = subprocess.run(
        cmd, env=cpu_devices_env(devices), capture_output=True, text=True, timeout=timeout, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with code {res.returncode}:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ------------------------------------------------------------------ the layer benchmark's implementations


def _layer_counts(name: str, mesh: Mesh, local: tuple[int, ...], rng: np.random.Generator) -> dict[str, int]:
    n, per_device = mesh.size, local[0]
    layer = IMPLEMENTATIONS[name].build(local, -1, jnp.float32, "batch")
    x = layer.prepare(jnp.asarray(rng.normal(size=(n * per_device, *local[1:])), jnp.float32))
    x = jax.device_put(x, NamedSharding(mesh, P("batch")))
    ct = jax.device_put(jnp.ones_like(x), NamedSharding(mesh, P("batch")))
    step = programs(layer)["train+grad"]
    d, r = P("batch"), P()
    fn = jax.shard_map(step, mesh=mesh, in_specs=(d, r, r, d), out_specs=(d, r, d, r), check_vma=False)
    return hlo.count_collectives(fn, x, layer.params, layer.state, ct)


def layer_collectives_here(
    names: Sequence[str], per_device: int = 4, features: int = 64
) -> dict[str, dict[str, object]]:
    """Collectives of a synchronized training forward + backward, per implementation, on this process's devices.

    One layer on NHWC float32 input `(devices * per_device, 4, 4, features)`
    sharded over a 1-D mesh axis ``"batch"`` with `jax.shard_map`. An
    implementation that fails gets `{"error": message}` instead of counts.
    """
    if jax.device_count() < 2:
        raise RuntimeError("layer_collectives_here needs >= 2 devices")
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, object]] = {}
    for name in names:
        try:
            out[name] = dict(_layer_counts(name, mesh, (per_device, 4, 4, features), rng))
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


def layer_collectives(names: Sequence[str], devices: int = 8) -> dict[str, dict[str, object]]:
    """`layer_collectives_here`, here if this process has >= 2 devices, else in a child with `devices`."""
    if jax.device_count() >= 2:
        return layer_collectives_here(names)
    return in_subprocess(["layer", "--collectives-only", "--impls", ",".join(names)], devices)  # type: ignore[return-value]


# ------------------------------------------------------------------ the sync-BN table (python -m jaxbn.collectives)


def sync_bn_step(impl: str, mesh: Mesh, axis_name: str = "data") -> Callable[..., object]:
    """One training step of one synchronized batch-norm layer under `jax.shard_map`.

    The returned function takes `(x, dy, scale, bias, mean, var)` (`x`, `dy`
    sharded over `axis_name`, the rest replicated) and returns the gradients
    of `sum(y * dy)` with respect to `x`, `scale`, `bias` and the updated
    running mean and variance; call it under `jax.jit`.

    Raises:
      ValueError: `impl` is not one of `IMPLS`.
    """
    import jaxbn

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def loss(x: jax.Array, scale: jax.Array, bias: jax.Array, dy: jax.Array, mean: jax.Array, var: jax.Array
             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:  # fmt: skip
        if impl.startswith("jaxbn"):
            stats = jaxbn.RunningStats(mean, var, jnp.zeros((), jnp.int32))
            y, new = jaxbn.batch_norm(
                x,
                stats,
                scale,
                bias,
                training=True,
                axis_name=axis_name,
                strategy=impl.split()[1],  # type: ignore[arg-type]
            )
            return jnp.sum(y * dy), (new.mean, new.var)
        import flax.linen as nn

        module = nn.BatchNorm(
            use_running_average=False,
            axis_name=axis_name,
            use_fast_variance=impl.endswith("True"),  # type: ignore[arg-type]
        )
        variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
        y, upd = module.apply(variables, x, mutable=["batch_stats"])
        return jnp.sum(y * dy), (upd["batch_stats"]["mean"], upd["batch_stats"]["var"])

    def local(x: jax.Array, dy: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array
              ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, jax.Array]]:  # fmt: skip
        (_, new), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias, dy, mean, var)
        return grads, new

    d, r = P(axis_name), P()
    return jax.shard_map(local, mesh=mesh, in_specs=(d, d, r, r, r, r), out_specs=((d, r, r), (r, r)))


def sync_bn_args(
    mesh: Mesh, axis_name: Hashable = "data", per_device: int = 8, features: int = 256
) -> tuple[jax.Array, ...]:
    """Example arguments for `sync_bn_step`: `x`, `dy` of shape (devices * per_device, features), then
    scale, bias, mean, var."""
    n = mesh.shape[axis_name] * per_device
    rng = np.random.default_rng(0)
    data = NamedSharding(mesh, P(axis_name))
    x = jax.device_put(rng.normal(size=(n, features)).astype(np.float32), data)
    dy = jax.device_put(rng.normal(size=(n, features)).astype(np.float32), data)
    ones, zeros = jnp.ones(features), jnp.zeros(features)
    return x, dy, ones, zeros, zeros, ones


def sync_bn_table(impls: Sequence[str] = IMPLS, features: int = 256) -> list[dict[str, object]]:
    """One row per implementation for ALL of this process's devices: counts and bytes by kind.

    `counts`/`bytes`: every collective of the compiled step.
    """
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    args = sync_bn_args(mesh, features=features)
    rows: list[dict[str, object]] = []
    for impl in impls:
        text = hlo.compiled_text(sync_bn_step(impl, mesh), *args)
        ops = hlo.parse_collectives(text)
        counts, nbytes = hlo.summarize_collectives(ops)
        rows.append({"impl": impl, "devices": jax.device_count(), "counts": counts, "bytes": nbytes})
    return rows


def table_in_subprocess(devices: int, impls: Sequence[str] = IMPLS) -> list[dict[str, object]]:
    """`sync_bn_table` run in a fresh Python with `devices` simulated CPU devices."""
    return in_subprocess(["collectives", "--json", "--impls", ",".join(impls)], devices)  # type: ignore[return-value]


def format_table(rows: Sequence[dict[str, object]]) -> str:
    """A plain-text table of `sync_bn_table` rows."""
    head = f"{'implementation':<22}{'devices':>8}{'collectives':>13}  {'kinds':<48}{'bytes/device':>13}"
    lines = [head, "-" * len(head)]
    for row in rows:
        counts: dict[str, int] = row["counts"]  # type: ignore[assignment]
        nbytes: dict[str, int] = row["bytes"]  # type: ignore[assignment]
        kinds = ", ".join(f"{c} {k} ({nbytes[k]} B)" for k, c in counts.items() if c)
        lines.append(
            f"{row['impl']!s:<22}{row['devices']!s:>8}{sum(counts.values()):>13}  {kinds or '-':<48}"
            f"{sum(nbytes.values()):>13}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the sync-BN collective table at 8 and 64 simulated devices (``python -m benchmarks collectives``).

    `--json` prints this process's rows as JSON instead (used per device count).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks collectives", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="8,64", help="comma-separated device counts (default 8,64)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated implementations")
    parser.add_argument("--json", action="store_true", help="rows for this process's devices, as JSON")
    opts = parser.parse_args(argv)
    impls = [i for i in opts.impls.split(",") if i]
    if opts.json:
        print(json.dumps(sync_bn_table(impls)))
        return
    rows = []
    for n in (int(d) for d in opts.devices.split(",")):
        rows.extend(table_in_subprocess(n, impls))
    print("One synchronized BatchNorm layer, jitted forward + backward under shard_map,")
    print("x: (8 per device, 256 features) float32. Bytes: HLO result sizes per device.")
    print(format_table(rows))
