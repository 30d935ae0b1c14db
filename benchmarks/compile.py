"""What batch norm costs to compile: ``python -m benchmarks compile [--quick] [--reps N] [--json]``.

For flax's ImageNet ResNet-18 and ResNet-50 training steps (`model.COST_GRID`,
float32) under 8-device `jax.pmap` and on one device, per batch norm (`IMPLS`):
seconds to trace and lower the step, seconds XLA takes to compile it, lines of
the optimized HLO, its `conditional` instructions and its collectives. BN's cost
in context is the value minus the identity (no BN) step's, and each in-context
cost is also given as jaxbn's over flax's. Timings are medians over `reps`
rounds, the implementations interleaved in each, with JAX's caches cleared and
the step built afresh before every measurement. Then one synchronized layer
(`collectives.sync_bn_step`) at `LAYER_FEATURES`: the lines of its lowered
StableHLO, which do not grow with the features.

8 simulated devices run in a child Python when this process has fewer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax

from benchmarks import hlo, model, timing
from benchmarks.collectives import in_subprocess, sync_bn_args, sync_bn_step
from benchmarks.grid import ModelCase

IMPLS = ("flax", "jaxbn.linen", "identity")
PLACEMENTS = ("pmap", "1dev")
QUICK_CASES = (ModelCase("resnet10", 16, 16, 8),)
LAYER_FEATURES = (64, 2048)
#: The costs taken in context (minus the identity step's) and compared, jaxbn over flax.
COSTS = ("lower_s", "compile_s", "hlo_lines")


def measure_step(case: ModelCase, impl: str, placement: str) -> dict[str, float]:
    """One measurement of a freshly built step, with JAX's caches cleared after building its arguments."""
    staged, args = model.build_step(case, impl, "float32", placement)
    jax.clear_caches()
    t0 = time.perf_counter()
    lowered = staged.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    text = compiled.as_text() or ""
    collectives = hlo.summarize_collectives(hlo.parse_collectives(text))[0]
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "hlo_lines": len(text.splitlines()),
            "conditionals": hlo.count_conditionals(text), "collectives": sum(collectives.values())}  # fmt: skip


def layer_lines(features: int) -> dict[str, int]:
    """Lines of the lowered StableHLO of one synchronized layer's step over every device, jaxbn's and flax's."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    args = sync_bn_args(mesh, features=features)
    return {
        name: len(jax.jit(sync_bn_step(impl, mesh)).lower(*args).as_text().splitlines())
        for name, impl in (("jaxbn", "jaxbn auto"), ("flax", "flax fast_var=True"))
    }


def measure(cases: Sequence[ModelCase], placements: Sequence[str], reps: int) -> dict[str, Any]:
    """The rows of every (model, placement, impl) and the layer rows, in this process."""
    rows: list[dict[str, Any]] = []
    for case in cases:
        for placement in placements:
            runs: dict[str, list[dict[str, float]]] = {impl: [] for impl in IMPLS}
            for order in timing.orders(list(IMPLS), reps):
                for impl in order:
                    runs[impl].append(measure_step(case, impl, placement))
            group: dict[str, dict[str, Any]] = {
                impl: {"model": case.label, "placement": placement, "impl": impl, **runs[impl][-1],
                       **{k: statistics.median(r[k] for r in runs[impl]) for k in ("lower_s", "compile_s")}}
                for impl in IMPLS
            }  # fmt: skip
            for r in group.values():
                r["in_context"] = {k: r[k] - group["identity"][k] for k in COSTS}
            for r in group.values():
                flax = group["flax"]["in_context"]
                r["vs_flax"] = {k: r["in_context"][k] / flax[k] if flax[k] else None for k in COSTS}
            rows += group.values()
    layer = [{"features": c, **layer_lines(c)} for c in LAYER_FEATURES]
    return {"results": rows, "layer": layer}


def run(cases: Sequence[ModelCase], placements: Sequence[str] = PLACEMENTS, reps: int = 3) -> dict[str, Any]:
    """The report: config and `measure`'s rows, measured in a child with 8 CPU devices if this process has fewer."""
    if jax.device_count() >= model.DEVICES:
        out = measure(cases, placements, reps)
    else:
        configs = ",".join(f"{c.arch}:{c.batch}:{c.image}:{c.width}" for c in cases)
        args = ["compile", "--here", "--reps", str(reps), "--configs", configs, "--placements", ",".join(placements)]
        out = in_subprocess(args, model.DEVICES, timeout=3600)  # type: ignore[assignment]
    config = {"cases": [c.label for c in cases], "placements": list(placements), "reps": reps, "dtype": "float32"}
    return {"config": config, **out}


def markdown(rep: dict[str, Any]) -> str:
    """The table docs/benchmark.md shows, and the layer line under it."""
    out = [
        "| model | placement | trace+lower in context: flax s, jaxbn / flax | XLA compile in context: flax s, "
        "jaxbn / flax | optimized HLO lines in context: flax, jaxbn / flax | conditionals, jaxbn "
        "| collectives, flax / jaxbn |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    by = {(r["model"], r["placement"], r["impl"]): r for r in rep["results"]}

    def cell(f: dict[str, Any], j: dict[str, Any], k: str, fmt: str) -> str:
        ratio = j["vs_flax"][k]
        return f"{f['in_context'][k]:{fmt}}, " + ("-" if ratio is None else f"{ratio:.2f}x")

    for (name, placement, impl), j in by.items():
        if impl != "jaxbn.linen":
            continue
        f = by[(name, placement, "flax")]
        out.append(
            f"| {name} | {placement} | {cell(f, j, 'lower_s', '.2f')} | {cell(f, j, 'compile_s', '.2f')} "
            f"| {cell(f, j, 'hlo_lines', 'd')} | {j['conditionals']} | {f['collectives']} / {j['collectives']} |"
        )
    layer = "; ".join(f"{r['features']} features: {r['jaxbn']} / {r['flax']}" for r in rep["layer"])
    out += ["", f"One synchronized layer, lines of its lowered StableHLO, jaxbn / flax: {layer}."]
    return "\n".join(out)


def main(argv: Sequence[str]) -> dict[str, Any] | None:
    """``python -m benchmarks compile``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ResNet-10 at width 8, batch 16, 1 rep: a smoke test")
    p.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--configs", help="comma-separated arch:batch:image:width (default the ResNet-18 and -50 steps)")
    p.add_argument("--placements", default=",".join(PLACEMENTS), help="comma-separated: pmap, 1dev")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(list(argv))
    cases = model.parse_configs(opts.configs) if opts.configs else list(QUICK_CASES if opts.quick else model.COST_GRID)
    placements = [s for s in opts.placements.split(",") if s]
    if [s for s in placements if s not in PLACEMENTS]:
        p.error(f"placements: choose from {', '.join(PLACEMENTS)}")
    reps = opts.reps or (1 if opts.quick else 3)
    if opts.here:
        print(json.dumps(measure(cases, placements, reps)))
        return None
    rep = run(cases, placements, reps)
    print(json.dumps(rep, indent=1) if opts.json else markdown(rep))
    return rep
