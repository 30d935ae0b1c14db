"""On a machine with a GPU: ``python -m benchmarks gpu [--out PATH] [--reps N] [--quick] [--allow-cpu]``.

One command: the layer benchmark (`benchmarks.layer`, its default grid, float32
and bfloat16, jaxbn and flax), the ResNet-18 and ResNet-50 training steps on one
device (`benchmarks.model`, `model.COST_GRID`: time per step, compiled temp
memory, compile time, jaxbn.linen vs flax), and a check that the compiled jaxbn
step holds no `conditional` (PASS; or FAIL, exit code 1). Prints a Markdown
summary; `--out` writes the JSON. Without a GPU it exits with code 2, unless
`--allow-cpu` (with `--quick`: a smoke test of the machinery).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax

from benchmarks import grid, layer, model, report

LAYER_IMPLS = ("jaxbn", "flax")
MODEL_IMPLS = ("flax", "jaxbn.linen")


def summary(rep: dict[str, Any]) -> str:
    """The Markdown summary: layer geomeans, the step rows, the conditional check."""
    lay, mod = rep["layer"], rep["model"]
    out = [f"Device: {rep['meta']['machine']['device']} ({rep['meta']['machine']['backend']}).", "",
           "| layer mode | dtype | jaxbn speedup vs flax (25-75%) |", "|---|---|---:|"]  # fmt: skip
    for mode in lay["config"]["modes"]:
        for dt in lay["config"]["dtypes"]:
            g = report.geomean_spread(lay, mode, dt, "jaxbn")
            out.append(f"| {mode} | {dt} | " + ("-" if g is None else f"{g[0]:.2f}x ({g[1]:.2f}-{g[2]:.2f})") + " |")
    out += ["", "| model | impl | step ms | vs flax | temp MiB | compile s | conditionals |", "|---|---|" + "---:|" * 5]
    for r in mod["results"]:
        out.append(
            f"| {r['model']} | {r['impl']} | {r['median_ms']:.2f} | {r['speedup_vs_flax']:.2f}x "
            f"| {r['temp_bytes'] / 2**20:.1f} | {r['compile_s']:.1f} | {r['conditionals']} |"
        )
    out += ["", f"conditionals in the compiled jaxbn.linen steps: {rep['conditionals']}: {rep['check']}"]
    return "\n".join(out)


def main(argv: Sequence[str]) -> dict[str, Any]:
    """``python -m benchmarks gpu``; raises SystemExit(2) without a GPU, SystemExit(1) when the check fails."""
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", metavar="PATH", help="write the JSON report there")
    p.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 10; --quick 2)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 reps: a smoke test, not a measurement")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke test)")
    opts = p.parse_args(list(argv))
    backend = jax.default_backend()
    if backend != "gpu" and not opts.allow_cpu:
        print(f"no GPU: jax.default_backend() is {backend!r} (--allow-cpu runs it anyway)", file=sys.stderr)
        raise SystemExit(2)
    reps = opts.reps or (2 if opts.quick else 10)
    cases = grid.QUICK_MODEL_GRID if opts.quick else model.COST_GRID
    shapes = grid.parse_cases("dense" if opts.quick else None, opts.quick)
    rep: dict[str, Any] = {
        "meta": {**report.metadata("python -m benchmarks gpu", argv), "quick": opts.quick},
        "layer": layer.run(shapes, list(grid.DTYPES), LAYER_IMPLS, reps, progress=False, with_collectives=False),
        "model": model.run(cases, ["1dev"], ["float32"], MODEL_IMPLS, reps, progress=False),
    }  # fmt: skip
    rep["conditionals"] = sum(r["conditionals"] for r in rep["model"]["results"] if r["impl"] == "jaxbn.linen")
    rep["check"] = "PASS" if rep["conditionals"] == 0 else "FAIL"
    print(summary(rep))
    if opts.out:
        with open(opts.out, "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=1)
    if rep["check"] != "PASS":
        raise SystemExit(1)
    return rep
