"""Every figure README.md and docs/benchmark.md quote, measured in one run: ``python -m benchmarks figures``.

One command runs, at the current commit, every part whose numbers the docs
quote and writes them into one JSON file (default `FIGURES_JSON`):

* ``layer``: the layer benchmark (`benchmarks.layer`) on its whole grid, every
  mode and dtype, with the residuals kept for the backward pass and the
  collectives of a synchronized step;
* ``model``: the whole-model benchmark (`benchmarks.model`) on ResNet-18,
  float32, on one device and on 8 devices (every placement), so the rows
  where batch norm costs more than flax's stand next to those where it costs less;
* ``collectives``: the collectives of one synchronized layer at 8 and 64
  simulated devices (`benchmarks.collectives`);
* ``claims``: the README comparison table's numerical claims (`benchmarks.claims`);
* ``costs``: compile-only costs of flax's ImageNet ResNet-18 and ResNet-50
  steps (`benchmarks.model.costs`): kernels, collectives, bytes accessed,
  BN in context, every placement and dtype;
* ``compile``: what batch norm costs to trace, lower and compile in flax's
  ResNet-18 and ResNet-50 steps, and the size of the compiled program
  (`benchmarks.compile`).

The file records the commit (and whether the tree had uncommitted changes),
the date, the machine and device, and the versions of jax, jaxlib, flax,
optax, equinox, haiku and numpy. ``python -m benchmarks render`` then writes the
tables of README.md and docs/benchmark.md from it (`benchmarks.render`).

Wall times come from one interleaved run per part (medians, with the spread
of the per-round ratios); bytes, kernels, collectives and residuals are
deterministic: they depend on the compiled program, not on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import grid

#: Where the figures are written and read, relative to the repository root.
FIGURES_JSON = os.path.join("docs", "figures.json")
#: The parts, in the order they run.
PARTS = ("claims", "collectives", "layer", "model", "costs", "compile")
#: Timed repetitions of the full run (``--quick``: 2; compile: 1), sized for about 15 minutes on 2 quiet CPU cores.
LAYER_REPS, MODEL_REPS, COMPILE_REPS = 5, 7, 3
#: The whole-model configuration the README quotes (and ``--quick``'s).
MODEL_CASE, QUICK_MODEL_CASE = grid.MODEL_GRID[0], grid.QUICK_MODEL_GRID[0]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state(root: str = ROOT) -> dict[str, Any]:
    """``{"commit": HEAD's hash or None, "dirty": whether tracked files differ from it}``."""

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def run(
    parts: Sequence[str] = PARTS,
    quick: bool = False,
    layer_reps: int | None = None,
    model_reps: int | None = None,
    progress: bool = True,
    argv: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs the named parts; returns the figures (what is written to `FIGURES_JSON`).

    Args:
      parts: a subset of `PARTS`.
      quick: tiny sizes and 2 repetitions: a smoke test of the machinery, never figures to publish
        (recorded as ``meta["quick"]``; ``render`` refuses such a file for the repository's pages).
      layer_reps, model_reps: timed repetitions (default `LAYER_REPS`, `MODEL_REPS`; 2 with `quick`).
      progress: progress bars on stderr.
      argv: the command line, recorded.

    Raises:
      ValueError: an unknown part.
    """
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    from benchmarks import report

    meta = report.metadata("python -m benchmarks figures", argv)
    out: dict[str, Any] = {"meta": {**meta, **git_state(), "quick": quick, "parts": list(parts)}}
    if "claims" in parts:
        from benchmarks import claims

        out["claims"] = claims.run(quick)
    if "collectives" in parts:
        from benchmarks.collectives import table_in_subprocess

        out["collectives"] = {str(n): table_in_subprocess(n) for n in ((8,) if quick else (8, 64))}
    if "layer" in parts:
        from benchmarks import layer, layers

        out["layer"] = layer.run(
            grid.parse_cases(None, quick),
            list(grid.DTYPES),
            list(layers.IMPLEMENTATIONS),
            reps=layer_reps or (2 if quick else LAYER_REPS),
            progress=progress,
            argv=["--reps", str(layer_reps or (2 if quick else LAYER_REPS))],
        )
    if "model" in parts:
        from benchmarks import model

        out["model"] = model.run(
            [QUICK_MODEL_CASE if quick else MODEL_CASE],
            list(grid.PLACEMENTS),
            ["float32"],
            model.IMPLS,
            reps=model_reps or (2 if quick else MODEL_REPS),
            progress=progress,
            argv=["--reps", str(model_reps or (2 if quick else MODEL_REPS))],
        )
    if "costs" in parts:
        from benchmarks import model

        out["costs"] = model.costs(
            [QUICK_MODEL_CASE] if quick else list(model.COST_GRID),
            ["1dev", "pmap"] if quick else list(grid.PLACEMENTS),
            ["float32"] if quick else list(grid.DTYPES),
            ["flax", "jaxbn.linen"],
        )
    if "compile" in parts:
        from benchmarks import compile as compile_cost
        from benchmarks import model

        quick_or_full = compile_cost.QUICK_CASES if quick else model.COST_GRID
        out["compile"] = compile_cost.run(quick_or_full, reps=1 if quick else COMPILE_REPS)
    out["meta"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks figures``: runs every part and writes the JSON (then run ``render``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m benchmarks figures",
        description="Measure every figure README.md and docs/benchmark.md quote, into one JSON file.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 reps: a smoke test, never figures to publish")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts (default {','.join(PARTS)})")
    p.add_argument(
        "--out", default=os.path.join(ROOT, FIGURES_JSON), help=f"JSON file to write (default {FIGURES_JSON})"
    )
    p.add_argument("--layer-reps", type=int, default=None, help=f"layer benchmark reps (default {LAYER_REPS})")
    p.add_argument("--model-reps", type=int, default=None, help=f"model benchmark reps (default {MODEL_REPS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--render", action="store_true", help="then write README.md and docs/benchmark.md from the JSON")
    opts = p.parse_args(args)
    if opts.render and opts.quick:
        p.error("--render writes the repository's pages: not from a --quick run")
    parts = [s for s in opts.parts.split(",") if s]
    bad = [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    figures = run(parts, opts.quick, opts.layer_reps, opts.model_reps, not opts.no_progress, args)
    with open(opts.out, "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=1)
        f.write("\n")
    print(f"wrote {opts.out}", file=sys.stderr)
    if opts.render:
        from benchmarks import render

        render.main(["--json", opts.out])
    else:
        print("now: python -m benchmarks render", file=sys.stderr)
    return figures
