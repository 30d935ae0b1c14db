"""The whole-model benchmark: a ResNet training step with each batch norm swapped in, and BN's cost in context.

For each configuration (`grid.ModelCase`), placement (`grid.PLACEMENTS`:
one device; 8 devices with `jax.shard_map` and the BN `axis_name`; 8 devices
with plain `jax.jit` over a sharded batch) and dtype, it compiles one jitted
training step (forward, softmax cross-entropy, backward, optax SGD with
momentum, batch_stats update) per batch-norm implementation
(`resnet.NORMS`), the identity (no BN) included, and times them with
interleaved repetitions. Per row: median step time, speedup vs flax (with the
spread of the per-round ratios), compile time, and from the compiled program
(`hlo.analyze`) temp bytes, bytes accessed, kernels and collectives. BN's
in-context cost is the row minus the identity row: time (median of the
per-round differences), bytes accessed, kernels and temp bytes.

The 8-device placements run in a child Python with 8 simulated CPU devices
when this process has fewer.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import hlo, report, timing
from benchmarks.collectives import in_subprocess
from benchmarks.grid import PLACEMENTS, ModelCase
from benchmarks.resnet import NORMS, resnet

#: A pytree of arrays (parameters, optimizer state).
PyTree: TypeAlias = Any
Row: TypeAlias = dict[str, Any]

#: Implementations compared, in table order ("identity" is the no-BN baseline).
IMPLS = ("flax", "flax-exact", "jaxbn.linen", "identity")
#: Every speedup and ratio is relative to this implementation.
REFERENCE = "flax"
#: The implementation the targets are checked for.
CANDIDATE = "jaxbn.linen"
#: Devices of the multi-device placements.
DEVICES = 8
AXIS = "batch"


def train_step(model: Any, lr: float = 0.1, axis_name: Hashable | None = None) -> tuple[Callable[..., Any], Any]:
    """`(step, tx)`: one SGD-with-momentum training step of `model` on `(params, batch_stats, opt_state, x, labels)`.

    With `axis_name`, the gradients and the loss are averaged over that axis
    (the step runs per device under `jax.shard_map`).
    """
    import optax

    tx = optax.sgd(lr, momentum=0.9)

    def step(params: PyTree, batch_stats: PyTree, opt_state: PyTree, x: jax.Array, labels: jax.Array) -> PyTree:
        def loss_fn(p: PyTree) -> tuple[jax.Array, PyTree]:
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
            # one-hot, not integer labels: the label gather's transpose is refused on an Explicit mesh (JAX 0.12)
            onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
            loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot).mean()
            return loss, upd.get("batch_stats", {})

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if axis_name is not None:
            grads, loss = jax.lax.pmean((grads, loss), axis_name)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return step, tx


@functools.lru_cache(maxsize=16)
def init_variables(case: ModelCase, impl: str, dtype: str) -> tuple[PyTree, PyTree]:
    """`(params, batch_stats)` of the model (cached: every placement of a configuration starts from the same)."""
    model = resnet(case.arch, impl, width=case.width, dtype=jnp.dtype(dtype))  # no named axis at init
    x = jnp.zeros((1, case.image, case.image, 3), dtype)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)  # compiling the random init takes longer than the step
    rng = np.random.default_rng(0)

    def value(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = getattr(path[-1], "key", "")
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))  # He-normal, as flax's convolutions
        return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(value, shapes)
    return variables["params"], variables.get("batch_stats", {})


def build_step(case: ModelCase, impl: str, dtype: str, placement: str) -> tuple[Any, tuple[Any, ...]]:
    """A fresh training step, staged for `placement` (`jax.jit(...)` or `jax.pmap(...)`: call `.lower(*args)`),
    and its arguments.

    Raises:
      ValueError: an unknown placement, or a batch the devices do not divide.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose from {', '.join(PLACEMENTS)}")
    dt = jnp.dtype(dtype)
    sharded = placement != "1dev"
    if sharded and (jax.device_count() < DEVICES or case.batch % DEVICES):
        raise ValueError(
            f"placement {placement!r} needs {DEVICES} devices (have {jax.device_count()}) and a batch they divide "
            f"(got {case.batch})"
        )
    axis_name = AXIS if placement in ("shard_map", "pmap") else None
    model = resnet(case.arch, impl, width=case.width, dtype=dt, axis_name=axis_name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(case.batch, case.image, case.image, 3)), dt)
    labels = jnp.asarray(rng.integers(0, 10, size=case.batch), jnp.int32)
    params, batch_stats = init_variables(case, impl, dtype)
    step, tx = train_step(model, axis_name=axis_name)
    opt_state = tx.init(params)
    args: tuple[Any, ...] = (params, batch_stats, opt_state, x, labels)
    fn: Callable[..., Any] = step
    if placement == "pmap":  # flax's imagenet train.py: replicated state, a leading device axis on the batch
        devices = jax.devices()[:DEVICES]
        replicated = jax.tree.map(lambda v: jnp.broadcast_to(v, (DEVICES, *jnp.shape(v))), args[:3])
        args = (*replicated, *(jnp.reshape(v, (DEVICES, -1, *v.shape[1:])) for v in (x, labels)))
        return jax.pmap(step, axis_name=AXIS, devices=devices), args
    if sharded:
        mesh = jax.make_mesh((DEVICES,), (AXIS,))
        rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
        args = (*jax.device_put(args[:3], rep), jax.device_put(x, data), jax.device_put(labels, data))
        if placement == "shard_map":
            r, d = P(), P(AXIS)
            fn = jax.shard_map(step, mesh=mesh, in_specs=(r, r, r, d, d), out_specs=r, check_vma=False)
    return jax.jit(fn), args


def compile_step(
    case: ModelCase, impl: str, dtype: str, placement: str
) -> tuple[jax.stages.Compiled, tuple[Any, ...], hlo.Cost]:
    """Builds, compiles and analyzes the training step (`build_step`); returns it, its arguments and its cost."""
    staged, args = build_step(case, impl, dtype, placement)
    t0 = time.perf_counter()
    compiled = staged.lower(*args).compile()
    return compiled, args, hlo.analyze(compiled, time.perf_counter() - t0)


def time_group(
    case: ModelCase, placement: str, dtype: str, impls: Sequence[str], reps: int, warmup: int, bar: timing.Progress
) -> list[Row]:
    """Times every implementation's step for one (configuration, placement, dtype), interleaved."""
    jobs: dict[str, Callable[[], object]] = {}
    costs: dict[str, hlo.Cost] = {}
    for impl in impls:
        compiled, args, costs[impl] = compile_step(case, impl, dtype, placement)
        jobs[impl] = (lambda c, a: lambda: c(*a))(compiled, args)
        for _ in range(warmup):
            jax.block_until_ready(jobs[impl]())
        bar.update(warmup)
    times = timing.interleave(jobs, reps, bar)
    return [
        {
            **dataclasses.asdict(case),
            "model": case.label,
            "placement": placement,
            "dtype": dtype,
            "impl": impl,
            "median_ms": timing.median_ms(times[impl]),
            "times_ms": [t * 1e3 for t in times[impl]],
            "compile_s": costs[impl].compile_s,
            "temp_bytes": costs[impl].temp_bytes,
            **_cost_fields(costs[impl]),
        }
        for impl in impls
    ]


def run_here(
    cases: Sequence[ModelCase], placements: Sequence[str], dtypes: Sequence[str], impls: Sequence[str], reps: int,
    warmup: int, bar: timing.Progress,
) -> list[Row]:  # fmt: skip
    """The rows of every group, all in this process."""
    rows: list[Row] = []
    for case in cases:
        for placement in placements:
            for dt in dtypes:
                bar.set_postfix_str(f"{case.arch} {placement} {dt}")
                rows += time_group(case, placement, dt, impls, reps, warmup, bar)
    return rows


#: The deterministic costs a compile-only row carries into its in-context ("bn") part.
_COST_KEYS = ("kernels", "bytes_accessed")


def _cost_fields(cost: hlo.Cost) -> Row:
    """A row's deterministic cost fields, from the compiled step's `hlo.Cost`."""
    return {"bytes_accessed": cost.bytes_accessed, "kernels": cost.kernels, "collectives": cost.collectives,
            "conditionals": cost.conditionals}  # fmt: skip


def _in_context(r: Row, ident: Row, ref: Row | None, keys: Sequence[str]) -> Row:
    """BN's cost in context: `r` minus the identity row for each key, and (given `ref`) `key_vs_flax` ratios."""
    bn = {k: r[k] - ident[k] for k in keys}
    if ref is not None:
        bn |= {f"{k}_vs_flax": _ratio(bn[k], ref[k] - ident[k]) for k in keys}
    return bn


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(rows: list[Row]) -> dict[str, Any]:
    """Adds the speedups and BN's in-context cost to `rows`; returns the target checks for `CANDIDATE`.

    In-context cost (`row["bn"]`): the row minus the identity row of its
    group, for the median of per-round time differences, bytes accessed,
    kernels and temp bytes, each also as a ratio to flax's.
    """
    groups: dict[tuple[str, str, str], dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["placement"], r["dtype"]), {})[r["impl"]] = r
    for group in groups.values():
        ref, ident = group.get(REFERENCE), group.get("identity")
        for r in group.values():
            r["speedup_vs_flax"] = ref["median_ms"] / r["median_ms"] if ref else None
            if ref:
                per_round = np.asarray(ref["times_ms"]) / np.asarray(r["times_ms"])
                r["speedup_iqr"] = list(timing.quartiles(per_round.tolist()))
            if ident is None or r["impl"] == "identity":
                r["bn"] = None
                continue
            r["bn"] = {
                "ms": float(np.median(np.asarray(r["times_ms"]) - np.asarray(ident["times_ms"]))),
                **_in_context(r, ident, None, ("bytes_accessed", "kernels", "temp_bytes")),
            }
        for r in group.values():
            bn, ref_bn = r["bn"], (ref or {}).get("bn")
            if bn is None:
                continue
            for key in ("bytes_accessed", "kernels", "temp_bytes", "ms"):
                bn[f"{'bytes' if key == 'bytes_accessed' else key.split('_')[0]}_vs_flax"] = (
                    _ratio(bn[key], ref_bn[key]) if ref_bn else None
                )
    misses: dict[str, list[str]] = {
        "in-context BN bytes accessed <= 0.7x flax's": [],
        "kernels <= flax's": [],
        "compiled temp bytes <= 0.85x flax's": [],
        "median step speedup vs flax >= 0.97": [],
    }
    for (model, placement, dtype), group in groups.items():
        c, ref = group.get(CANDIDATE), group.get(REFERENCE)
        if c is None or ref is None:
            continue
        where = f"{model} {placement} {dtype}"
        bytes_ratio = (c["bn"] or {}).get("bytes_vs_flax")
        temp_ratio = _ratio(c["temp_bytes"], ref["temp_bytes"])
        checks = [
            (bytes_ratio is not None and bytes_ratio <= 0.7, f"{bytes_ratio:.2f}x" if bytes_ratio else "-"),
            (c["kernels"] <= ref["kernels"], f"{c['kernels']} vs {ref['kernels']}"),
            (temp_ratio is not None and temp_ratio <= 0.85, f"{temp_ratio:.2f}x" if temp_ratio else "-"),
            (c["speedup_vs_flax"] >= 0.97, f"{c['speedup_vs_flax']:.2f}x"),
        ]
        for (ok, got), name in zip(checks, misses, strict=True):
            if not ok:
                misses[name].append(f"{where} ({got})")
    return {"targets": misses}


def run(
    cases: Sequence[ModelCase],
    placements: Sequence[str],
    dtypes: Sequence[str],
    impls: Sequence[str] = IMPLS,
    reps: int = 9,
    warmup: int = 1,
    progress: bool = True,
    argv: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs the whole-model benchmark; returns the report (what `--json` prints).

    Args:
      cases: model configurations.
      placements: keys of `grid.PLACEMENTS`; the 8-device ones run in a child
        Python with 8 simulated CPU devices when this process has fewer.
      dtypes: compute dtypes (parameters stay float32).
      impls: keys of `resnet.NORMS`; "identity" is added (BN's cost needs it).
      reps: interleaved timed repetitions per step.
      warmup: untimed calls after compilation.
      progress: show a tqdm bar on stderr (if tqdm is installed).
      argv: the command line, recorded in the report.

    Raises:
      ValueError: an unknown implementation.
    """
    bad = [i for i in impls if i not in NORMS]
    if bad:
        raise ValueError(f"unknown implementation(s) {bad}; choose from {', '.join(NORMS)}")
    impls = list(dict.fromkeys([*impls, "identity"]))
    meta = report.metadata("python -m benchmarks model", argv)
    here = [p for p in placements if p == "1dev" or jax.device_count() >= DEVICES]
    away = [p for p in placements if p not in here]
    bar = timing.progress(len(cases) * len(placements) * len(dtypes) * len(impls) * (reps + warmup), progress)
    try:
        rows = run_here(cases, here, dtypes, impls, reps, warmup, bar)
        if away:
            bar.set_postfix_str(f"{', '.join(away)}: {DEVICES} simulated devices in a child process")
            args = ["model", "--rows-only", "--no-progress", "--reps", str(reps), "--warmup", str(warmup),
                    "--placements", ",".join(away), "--dtypes", ",".join(dtypes), "--impls", ",".join(impls),
                    "--configs", ",".join(f"{c.arch}:{c.batch}:{c.image}:{c.width}" for c in cases)]  # fmt: skip
            rows += in_subprocess(args, DEVICES, timeout=3600)  # type: ignore[arg-type]
            bar.update(len(cases) * len(away) * len(dtypes) * len(impls) * (reps + warmup))
    finally:
        bar.close()
    out: dict[str, Any] = {
        "meta": meta,
        "config": {
            "cases": [dataclasses.asdict(c) for c in cases],
            "placements": {p: PLACEMENTS[p] for p in placements},
            "dtypes": list(dtypes),
            "reps": reps,
            "warmup": warmup,
            "reference": REFERENCE,
            "optimizer": "optax.sgd(0.1, momentum=0.9)",
        },
        "implementations": impls,
        "descriptions": {i: NORMS[i] for i in impls},
        "skipped": {},
        "results": rows,
    }
    out["summary"] = summarize(rows)
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return out


#: The whole-model cost grid (compile-only, deterministic): flax's ImageNet ResNet-18 and ResNet-50 at
#: width 64, global batch 32 at 32 px, as in `costs`.
COST_GRID = (ModelCase("resnet18", 32, 32, 64), ModelCase("resnet50", 32, 32, 64))


def costs(
    cases: Sequence[ModelCase], placements: Sequence[str], dtypes: Sequence[str], impls: Sequence[str] = IMPLS
) -> list[Row]:
    """Compile-only rows: each step's deterministic costs and BN's in-context cost, no timing.

    Per row: kernels, collectives, conditionals, bytes accessed and, under
    "bn", the row minus the identity row with ratios to flax's. The
    8-device placements run in a child Python when this process has fewer
    devices.
    """
    impls = list(dict.fromkeys([*impls, "identity"]))
    here = [p for p in placements if p == "1dev" or jax.device_count() >= DEVICES]
    away = [p for p in placements if p not in here]
    rows: list[Row] = []
    for case in cases:
        for placement in here:
            for dt in dtypes:
                group = {}
                for impl in impls:
                    cost = compile_step(case, impl, dt, placement)[2]
                    group[impl] = {"model": case.label, "placement": placement, "dtype": dt, "impl": impl,
                                   **_cost_fields(cost)}  # fmt: skip
                ref, ident = group.get(REFERENCE), group["identity"]
                for r in group.values():
                    r["bn"] = None if r["impl"] == "identity" else _in_context(r, ident, ref, _COST_KEYS)
                rows += group.values()
    if away:
        configs = ",".join(f"{c.arch}:{c.batch}:{c.image}:{c.width}" for c in cases)
        args = ["model", "--compile-only", "--placements", ",".join(away), "--dtypes", ",".join(dtypes),
                "--impls", ",".join(impls), "--configs", configs]  # fmt: skip
        rows += in_subprocess(args, DEVICES, timeout=3600)  # type: ignore[arg-type]
    return rows


def parse_configs(spec: str) -> list[ModelCase]:
    """Model configurations from `arch:batch:image:width` items, comma-separated.

    >>> parse_configs("resnet18:16:32:64")
    [ModelCase(arch='resnet18', batch=16, image=32, width=64)]

    Raises:
      ValueError: a malformed item.
    """
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"bad model config {item!r}: use arch:batch:image:width, e.g. resnet18:16:32:64")
        out.append(ModelCase(parts[0], int(parts[1]), int(parts[2]), int(parts[3])))
    return out
