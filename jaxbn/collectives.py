"""Count the collectives in a compiled JAX program, and what they move.

`count_collectives(fn, *args)` compiles `jax.jit(fn)` for `args` and counts
the cross-device collectives in the optimized HLO (after XLA has combined
and removed what it could), by kind: all-reduce, all-gather, reduce-scatter,
collective-permute and all-to-all. `collective_bytes` adds the bytes each
kind produces per device, read off the HLO result shapes: an all-reduce's
payload is its operand's size whatever the device count, an all-gather's
result grows with the number of participants.

`python -m jaxbn.collectives` prints, for one synchronized batch-norm layer
(a jitted forward + backward step under `jax.shard_map`), the collectives
of jaxbn's strategies next to `flax.linen.BatchNorm`'s, at 8 and 64
simulated CPU devices (each count in its own subprocess, since the device
count is fixed when JAX starts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

#: The collective kinds counted, in table order.
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_OP_RE = re.compile(
    r"=\s*(?P<shape>\((?:[^()]|\([^()]*\))*\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<kind>" + "|".join(KINDS) + r")(?P<suffix>-start|-done)?\("
)
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_GROUPS_RE = re.compile(r"replica_groups=(\{\{[^=]*?\}\}|\[[0-9,]+\]<=\[[0-9,]+\][^,\s]*)")


class CollectiveOp(NamedTuple):
    """One collective instruction of a compiled HLO module.

    Attributes:
      kind: one of `KINDS`.
      shape: the HLO result shape, as printed.
      bytes: bytes of the result on each device (for an async `-start` op
        returning a tuple, the last array: the result buffer).
      group_size: participants per replica group, or None if not printed.
    """

    kind: str
    shape: str
    bytes: int
    group_size: int | None


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY_RE.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 4)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return total


def _group_size(line: str) -> int | None:
    m = _GROUPS_RE.search(line)
    if m is None:
        return None
    groups = m.group(1)
    if groups.startswith("{{"):
        first = groups[2:].split("}", 1)[0]
        return len([g for g in first.split(",") if g.strip()])
    dims = groups[1:].split("]", 1)[0].split(",")  # iota form [num_groups,group_size]<=[...]
    return int(dims[-1])


def parse_collectives(hlo_text: str) -> list[CollectiveOp]:
    """Every collective instruction in HLO text (`-done` halves of async pairs skipped).

    Args:
      hlo_text: HLO module text, e.g. `jax.jit(f).lower(x).compile().as_text()`.

    Returns:
      One `CollectiveOp` per instruction, in program order.

    >>> hlo = "%ar = f32[2,16]{1,0} all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%sum"
    >>> parse_collectives(hlo)
    [CollectiveOp(kind='all-reduce', shape='f32[2,16]{1,0}', bytes=128, group_size=4)]
    """
    ops = []
    for line in hlo_text.splitlines():
        m = _OP_RE.search(line)
        if m is None or m.group("suffix") == "-done":
            continue
        shape, kind = m.group("shape"), m.group("kind")
        arrays = ["{}[{}]".format(*a) for a in _ARRAY_RE.findall(shape)]
        if m.group("suffix") == "-start" and kind == "all-gather":
            arrays = arrays[len(arrays) // 2 :]  # (operands..., results...)
        elif m.group("suffix") == "-start" and kind == "collective-permute":
            arrays = arrays[1:2]  # (operand, result, context...)
        nbytes = sum(_shape_bytes(a) for a in arrays)
        ops.append(CollectiveOp(kind, shape, nbytes, _group_size(line)))
    return ops


def compiled_text(fn: Callable[..., Any], *args: Any) -> str:
    """The optimized HLO text of `jax.jit(fn)` for `args`."""
    return jax.jit(fn).lower(*args).compile().as_text() or ""


def collective_ops(fn: Callable[..., Any], *args: Any) -> list[CollectiveOp]:
    """The collectives XLA keeps in `jax.jit(fn)` compiled for `args` (see `parse_collectives`)."""
    return parse_collectives(compiled_text(fn, *args))


def summarize(ops: Sequence[CollectiveOp]) -> tuple[dict[str, int], dict[str, int]]:
    """(count per kind, result bytes per kind) of `ops`; every kind of `KINDS` is a key."""
    counts = dict.fromkeys(KINDS, 0)
    nbytes = dict.fromkeys(KINDS, 0)
    for op in ops:
        counts[op.kind] += 1
        nbytes[op.kind] += op.bytes
    return counts, nbytes


def count_collectives(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """Counts the collectives of `jax.jit(fn)` compiled for `args`, by kind.

    The count is taken on the optimized HLO
    (`jax.jit(fn).lower(*args).compile().as_text()`), so collectives XLA
    combines count once and async start/done pairs count once.

    Args:
      fn: a function `jax.jit` can trace.
      *args: example arguments (arrays, placed or sharded as in real use).

    Returns:
      `{kind: count}` for every kind of `KINDS` (zeros included).

    >>> import jax.numpy as jnp
    >>> count_collectives(lambda x: jnp.sum(x ** 2), jnp.ones(4))["all-reduce"]
    0
    """
    return summarize(collective_ops(fn, *args))[0]


def collective_bytes(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """Bytes produced per device by each kind of collective in `jax.jit(fn)` for `args`.

    Read off the HLO result shapes: an all-reduce of a `(2, 256)` float32
    array counts 2048 bytes, an all-gather over 8 devices of `(3, 256)`
    float32 counts its `(8, 3, 256)` result, 24576 bytes.

    Returns:
      `{kind: bytes}` for every kind of `KINDS` (zeros included).

    >>> import jax.numpy as jnp
    >>> collective_bytes(lambda x: x + 1, jnp.ones(4))["all-gather"]
    0
    """
    return summarize(collective_ops(fn, *args))[1]


# --------------------------------------------------------------------------
# The sync-BN comparison behind `python -m jaxbn.collectives`.

#: Implementations compared: jaxbn's strategies and flax.linen.BatchNorm.
IMPLS = ("jaxbn auto", "jaxbn gather", "jaxbn psum", "flax fast_var=True", "flax fast_var=False")


def sync_bn_step(impl: str, mesh: Any, axis_name: str = "data") -> Callable[..., Any]:
    """One training step of one synchronized batch-norm layer under `jax.shard_map`.

    The returned function takes `(x, dy, scale, bias, mean, var)` (`x`, `dy`
    sharded over `axis_name`, the rest replicated) and returns the gradients
    of `sum(y * dy)` with respect to `x`, `scale`, `bias` and the updated
    running mean and variance; call it under `jax.jit`.
    """
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jaxbn

    def local(x, dy, scale, bias, mean, var):
        if impl.startswith("jaxbn"):
            strategy = impl.split()[1]

            def loss(x, scale, bias):
                stats = jaxbn.RunningStats(mean, var, jnp.zeros((), jnp.int32))
                y, new = jaxbn.batch_norm(
                    x, stats, scale, bias, training=True, axis_name=axis_name, strategy=strategy  # type: ignore[arg-type]
                )
                return jnp.sum(y * dy), (new.mean, new.var)

        elif impl.startswith("flax"):
            import flax.linen as nn

            module = nn.BatchNorm(
                use_running_average=False, axis_name=axis_name, use_fast_variance=impl.endswith("True")
            )

            def loss(x, scale, bias):
                variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
                y, upd = module.apply(variables, x, mutable=["batch_stats"])
                return jnp.sum(y * dy), (upd["batch_stats"]["mean"], upd["batch_stats"]["var"])

        else:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        (_, new), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
        return grads, new

    d, r = P(axis_name), P()
    return jax.shard_map(local, mesh=mesh, in_specs=(d, d, r, r, r, r), out_specs=((d, r, r), (r, r)))


def sync_bn_args(mesh: Any, axis_name: str = "data", per_device: int = 8, features: int = 256) -> tuple:
    """Example arguments for `sync_bn_step`: `x`, `dy` of shape (devices * per_device, features)."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = mesh.shape[axis_name] * per_device
    rng = np.random.default_rng(0)
    data = NamedSharding(mesh, P(axis_name))
    x = jax.device_put(rng.normal(size=(n, features)).astype(np.float32), data)
    dy = jax.device_put(rng.normal(size=(n, features)).astype(np.float32), data)
    ones, zeros = jnp.ones(features), jnp.zeros(features)
    return x, dy, ones, zeros, zeros, ones


def sync_bn_table(impls: Sequence[str] = IMPLS, features: int = 256) -> list[dict[str, Any]]:
    """One row per implementation for ALL of this process's devices: counts and bytes by kind."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    args = sync_bn_args(mesh, features=features)
    rows = []
    for impl in impls:
        counts, nbytes = summarize(collective_ops(sync_bn_step(impl, mesh), *args))
        rows.append({"impl": impl, "devices": jax.device_count(), "counts": counts, "bytes": nbytes})
    return rows


def cpu_devices_env(devices: int) -> dict[str, str]:
    """This process's environment for a child Python with `devices` simulated CPU devices."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def table_in_subprocess(devices: int, impls: Sequence[str] = IMPLS, timeout: float = 300) -> list[dict[str, Any]]:
    """`sync_bn_table` run in a fresh Python with `devices` simulated CPU devices."""
    env = cpu_devices_env(devices)
    cmd = [sys.executable, "-m", "jaxbn.collectives", "--json", "--impls", ",".join(impls)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of `sync_bn_table` rows."""
    head = f"{'implementation':<22}{'devices':>8}{'collectives':>13}  {'kinds':<48}{'bytes/device':>13}"
    lines = [head, "-" * len(head)]
    for row in rows:
        kinds = ", ".join(f"{c} {k} ({row['bytes'][k]} B)" for k, c in row["counts"].items() if c)
        total = sum(row["counts"].values())
        lines.append(
            f"{row['impl']:<22}{row['devices']:>8}{total:>13}  {kinds or '-':<48}{sum(row['bytes'].values()):>13}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the sync-BN collective table at 8 and 64 simulated devices.

    `--json` prints this process's rows as JSON instead (used per device count).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jaxbn.collectives", description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    main()
