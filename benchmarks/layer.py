"""The layer benchmark: one batch-norm layer of each library, timed side by side.

For each grid row (shape, dtype) and implementation it compiles three
programs (`layers.MODES`: training forward, forward + backward, inference),
times them with interleaved repetitions (`timing.interleave`, a 64 MiB copy
interleaved with them as the bandwidth probe) and reads their deterministic
costs off the optimized HLO (`hlo`): kernels, full-size passes over x,
bytes accessed. Per row it reports the median time, the speedup vs flax, the
residuals the backward pass keeps, and the limit column: the bytes a batch
norm must move (`layers.PASSES` times x's bytes) over the time, as a
fraction of the bandwidth the copy reached in the same run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from benchmarks import hlo, report, timing
from benchmarks.collectives import layer_collectives
from benchmarks.grid import Case
from benchmarks.layers import ANCHORS, IMPLEMENTATIONS, MODES, PASSES, REFERENCE, available, programs, residual_bytes

Row = dict[str, object]


def _prepare_jobs(
    name: str,
    case: Case,
    dt: jnp.dtype,
    x0: jax.Array,
    key: jax.Array,
    modes: Sequence[str],
    warmup: int,
    bar: timing.Progress,
) -> tuple[
    dict[tuple[str, str], Callable[[], object]], dict[tuple[str, str], tuple[hlo.Cost, float]], tuple[float, int]
]:
    """Builds, compiles and warms up one implementation's programs.

    Returns:
      The jobs, their (cost, full-size passes over x) and the residuals (multiple of x's bytes, small bytes).
    """
    layer = IMPLEMENTATIONS[name].build(case.shape, case.axis, dt, None)
    x = layer.prepare(x0)
    progs = programs(layer)
    y_aval = jax.eval_shape(progs["train"], x, layer.params, layer.state)[0]
    ct = jax.random.normal(jax.random.fold_in(key, 1), y_aval.shape, jnp.float32).astype(y_aval.dtype)
    big, small = residual_bytes(layer, x, case.shape[case.axis])
    jobs, costs = {}, {}
    for mode in modes:
        args = (x, layer.params, layer.state) + ((ct,) if mode == "train+grad" else ())
        t0 = time.perf_counter()
        compiled = jax.jit(progs[mode]).lower(*args).compile()
        cost = hlo.analyze(compiled, time.perf_counter() - t0)
        costs[(name, mode)] = cost, hlo.full_size_passes(compiled.as_text() or "", x.size, x.dtype.itemsize)
        call = (lambda c, a: lambda: c(*a))(compiled, args)
        for _ in range(warmup):
            jax.block_until_ready(call())
            bar.update(1)
        jobs[(name, mode)] = call
    return jobs, costs, (big / x.nbytes, small)


def time_case(
    case: Case,
    dtype: str,
    names: Sequence[str],
    reps: int,
    warmup: int,
    modes: Sequence[str],
    bar: timing.Progress,
    seed: int = 0,
    failed: dict[str, str] | None = None,
) -> tuple[list[Row], list[float]]:
    """Times every implementation and mode on one (shape, dtype), interleaved with the bandwidth probe.

    An implementation that fails to build or compile is left out of the rows
    and its error recorded in `failed` (re-raised when `failed` is None).

    Returns:
      The result rows and the copy probe's bandwidths (bytes/s), one per rep.
    """
    dt = jnp.dtype(dtype)
    key = jax.random.key(seed)
    x0 = (jax.random.normal(key, case.shape, jnp.float32) * 2.0 + 0.5).astype(dt)
    jobs: dict[tuple[str, str], Callable[[], object]] = {}
    costs: dict[tuple[str, str], tuple[hlo.Cost, float]] = {}
    resid: dict[str, tuple[float, int]] = {}
    for name in names:
        try:
            more, more_costs, resid[name] = _prepare_jobs(name, case, dt, x0, key, modes, warmup, bar)
        except Exception as e:
            if failed is None:
                raise
            failed[name] = f"failed on {case.key} {dtype}: {type(e).__name__}: {e}"[:500]
            continue
        jobs.update(more)
        costs.update(more_costs)
    copy, copy_bytes = timing.copy_job()
    times = timing.interleave({**jobs, ("copy", "copy"): copy}, reps, bar, seed)
    bandwidths = [copy_bytes / t for t in times.pop(("copy", "copy"))]
    rows: list[Row] = []
    for (name, mode), ts in times.items():
        cost, passes = costs[(name, mode)]
        rows.append(
            {
                "case": case.key,
                "shape": list(case.shape),
                "axis": case.axis,
                "layout": case.layout,
                "dtype": dtype,
                "mode": mode,
                "impl": name,
                "median_ms": timing.median_ms(ts),
                "times_ms": [t * 1e3 for t in ts],
                "residual_multiple": resid[name][0],
                "residual_small_bytes": resid[name][1],
                "kernels": cost.kernels,
                "full_size_passes": passes,
                "bytes_accessed": cost.bytes_accessed,
                # XLA's bytes accessed in passes over x's bytes (floor 8 for a train fwd+bwd)
                "bytes_passes": cost.bytes_accessed / x0.nbytes,
                "temp_bytes": cost.temp_bytes,
                "compile_s": cost.compile_s,
                "min_bytes": PASSES[mode] * x0.nbytes,
            }
        )
    return rows, bandwidths


def _match(r: Row, mode: str, impl: str, dtype: str) -> bool:
    return r["mode"] == mode and r["impl"] == impl and dtype in ("all", r["dtype"])


def summarize(rows: list[Row], names: Sequence[str], bandwidth: float) -> dict[str, object]:
    """Adds `speedup_vs_flax`, `vs_best_anchor` and `limit_fraction` to `rows`; returns geomeans and target checks.

    `limit_fraction` = (`min_bytes` / median time) / `bandwidth` (bytes/s).
    """
    index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    anchors = [a for a in ANCHORS if a in names]
    for r in rows:
        ms = float(r["median_ms"])  # type: ignore[arg-type]
        ref = index.get((r["case"], r["dtype"], r["mode"], REFERENCE))
        r["speedup_vs_flax"] = float(ref["median_ms"]) / ms if ref else None  # type: ignore[arg-type]
        best = [float(index[k]["median_ms"]) for a in anchors if (k := (r["case"], r["dtype"], r["mode"], a)) in index]  # type: ignore[arg-type]
        r["vs_best_anchor"] = min(best) / ms if best else None
        r["limit_fraction"] = float(r["min_bytes"]) / (ms * 1e-3) / bandwidth if bandwidth else None  # type: ignore[arg-type]
    geo: dict[str, dict[str, dict[str, float | None]]] = {}
    modes = list(dict.fromkeys(str(r["mode"]) for r in rows))
    dtypes = list(dict.fromkeys(str(r["dtype"]) for r in rows))
    for mode in modes:
        geo[mode] = {}
        for dt in [*dtypes, "all"]:
            geo[mode][dt] = {
                n: timing.geomean([r["speedup_vs_flax"] for r in rows if _match(r, mode, n, dt)])  # type: ignore[misc]
                for n in names
            }
    slow = [
        {k: r[k] for k in ("case", "dtype", "mode", "median_ms", "vs_best_anchor")}
        for r in rows
        if r["impl"] == "jaxbn" and r["vs_best_anchor"] is not None and float(r["vs_best_anchor"]) < 1 / 1.05  # type: ignore[arg-type]
    ]
    resid: dict[str, dict[str, float]] = {}
    for r in rows:
        d = resid.setdefault(str(r["impl"]), {})
        d[str(r["dtype"])] = max(d.get(str(r["dtype"]), 0.0), float(r["residual_multiple"]))  # type: ignore[arg-type]
    fb = geo.get("train+grad", {}).get("all", {}).get("jaxbn")
    return {
        "geomean_speedup_vs_flax": geo,
        "residual_multiple": resid,
        "bandwidth_gbs": bandwidth / 1e9,
        "targets": {
            "train+grad geomean speedup vs flax >= 1.25": None if fb is None else fb >= 1.25,
            "jaxbn rows slower than the fastest anchor by > 5%": slow,
            "jaxbn residuals <= 1.0x input": all(v <= 1.0 + 1e-9 for v in resid.get("jaxbn", {}).values()),
        },
    }


def run(
    cases: Sequence[Case],
    dtypes: Sequence[str],
    names: Sequence[str],
    reps: int,
    warmup: int = 1,
    modes: Sequence[str] = MODES,
    progress: bool = True,
    with_collectives: bool = True,
    argv: Sequence[str] = (),
) -> dict[str, object]:
    """Runs the layer benchmark; returns the report (what `--json` prints).

    Args:
      cases: grid shapes.
      dtypes: dtype names, e.g. ``("float32", "bfloat16")``.
      names: implementations (keys of `layers.IMPLEMENTATIONS`); missing packages are skipped.
      reps: timed repetitions per program.
      warmup: untimed calls after compilation.
      modes: subset of `layers.MODES`.
      progress: show a tqdm bar on stderr (if tqdm is installed).
      with_collectives: also count the collectives of a synchronized step.
      argv: the command line, recorded in the report.
    """
    meta = report.metadata("python -m benchmarks layer", argv)
    names, skipped = available(names)
    total = len(cases) * len(dtypes) * (len(names) * len(modes) * (reps + warmup) + reps)
    bar = timing.progress(total, progress)
    rows: list[Row] = []
    bandwidths: list[float] = []
    failed: dict[str, str] = {}
    try:
        for case in cases:
            for dt in dtypes:
                bar.set_postfix_str(f"{case.key} {dt}")
                live = [n for n in names if n not in failed]
                more, bw = time_case(case, dt, live, reps, warmup, modes, bar, failed=failed)
                rows.extend(more)
                bandwidths.extend(bw)
    finally:
        bar.close()
    if "jaxbn" in failed:
        raise RuntimeError(f"jaxbn itself failed: {failed['jaxbn']}")
    # An implementation that failed anywhere is dropped everywhere (rows must be comparable).
    names = [n for n in names if n not in failed]
    rows = [r for r in rows if r["impl"] in names]
    skipped.update(failed)
    bandwidth = max(bandwidths) if bandwidths else 0.0
    out: dict[str, object] = {
        "meta": meta,
        "config": {
            "cases": [dataclasses.asdict(c) for c in cases],
            "dtypes": list(dtypes),
            "modes": list(modes),
            "reps": reps,
            "warmup": warmup,
            "reference": REFERENCE,
            "passes": PASSES,
            "copy_bytes": timing.COPY_BYTES,
        },
        "implementations": list(names),
        "descriptions": {n: IMPLEMENTATIONS[n].description for n in names},
        "skipped": skipped,
        "bandwidth_gbs_per_rep": [b / 1e9 for b in bandwidths],
        "results": rows,
    }
    out["summary"] = summarize(rows, names, bandwidth)
    if with_collectives:
        devices = jax.device_count() if jax.device_count() >= 2 else 8
        try:
            out["collectives"] = {"devices": devices, "counts": layer_collectives(names, devices)}
        except Exception as e:  # reported, not fatal: timings are still valid
            out["collectives"] = {"devices": devices, "error": f"{type(e).__name__}: {e}"[:2000]}
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return out
