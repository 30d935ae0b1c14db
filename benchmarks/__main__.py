"""Command line: ``python -m benchmarks [PART] [options]`` (``--help`` on each); the parts:

* ``layer`` (the default when no part is named): one batch-norm layer of each
  library, timed side by side (`benchmarks.layer`);
* ``model``: a ResNet training step with each batch norm swapped in, and BN's
  in-context cost (`benchmarks.model`);
* ``collectives``: the collectives of one synchronized batch-norm step at 8 and
  64 simulated devices (`benchmarks.collectives`);
* ``figures``: every figure README.md and docs/benchmark.md quote, measured
  into one JSON file (`benchmarks.figures`);
* ``render``: README.md's and docs/benchmark.md's tables written from that
  JSON (`benchmarks.render`);
* ``compile``: what batch norm costs to trace, lower and compile in a ResNet
  training step, and the size of the compiled program (`benchmarks.compile`);
* ``gpu``: on a GPU, the layer and ResNet step rows and a check that the
  compiled jaxbn step holds no conditional (`benchmarks.gpu`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

from benchmarks import grid

PARTS = ("layer", "model", "collectives", "figures", "render", "compile", "gpu")


def _common(p: argparse.ArgumentParser, impls: Sequence[str], default_reps: str) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 reps: a smoke test, not a measurement")
    p.add_argument("--dtypes", default=",".join(grid.DTYPES), help="comma-separated dtypes (default float32,bfloat16)")
    p.add_argument("--impls", default=",".join(impls), help="comma-separated implementations")
    p.add_argument("--reps", type=int, default=None, help=f"timed repetitions per program ({default_reps})")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compilation (default 1)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of tables")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables instead of plain text")
    p.add_argument("--from-json", metavar="PATH", help="re-print a --json report or this part of docs/figures.json")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the results (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _output(opts: argparse.Namespace, rep: dict[str, Any], text: Callable[..., str], plot: Callable[..., None]) -> None:
    if opts.plot:
        try:
            plot(rep, opts.plot)
        except ImportError as e:
            print(f"--plot skipped: matplotlib is not installed ({e})", file=sys.stderr)
    print(json.dumps(rep, indent=1) if opts.json else text(rep, opts.markdown))


def _load(path: str, part: str) -> dict[str, Any]:
    """A saved report: `--json`'s output, or the `part` of `python -m benchmarks figures`' file."""
    with open(path) as f:
        saved: dict[str, Any] = json.load(f)
    return saved[part] if "results" not in saved and part in saved else saved


def layer_main(argv: Sequence[str], prog: str = "python -m benchmarks layer") -> dict[str, Any] | None:
    """``python -m benchmarks layer``: the layer benchmark."""
    from benchmarks import layers, plot, report

    p = argparse.ArgumentParser(prog=prog, description="Time one batch-norm layer of each library side by side.")
    _common(p, tuple(layers.IMPLEMENTATIONS), "default 10; --quick 2")
    p.add_argument(
        "--shapes", help=f"comma-separated grid keys ({', '.join(c.key for c in grid.GRID)}) or AxBxC[@axis]"
    )
    p.add_argument("--modes", default=",".join(layers.MODES), help="comma-separated modes: " + ", ".join(layers.MODES))
    p.add_argument("--no-collectives", action="store_true", help="skip the synchronized-step collective count")
    p.add_argument("--collectives-only", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(list(argv))
    names = [n for n in opts.impls.split(",") if n]

    def text(rep: dict[str, Any], markdown: bool) -> str:
        return report.markdown_layer(rep) if markdown else report.format_layer(rep)

    if opts.collectives_only:
        from benchmarks.collectives import layer_collectives_here

        print(json.dumps(layer_collectives_here(layers.available(names)[0])))
        return None
    if opts.from_json:
        saved = _load(opts.from_json, "layer")
        print(text(saved, opts.markdown))
        return saved
    modes = _pick(p, opts.modes, layers.MODES, "mode(s)")
    from benchmarks import layer

    rep = layer.run(
        grid.parse_cases(opts.shapes, opts.quick),
        [d for d in opts.dtypes.split(",") if d],
        names,
        reps=opts.reps if opts.reps is not None else (2 if opts.quick else 10),
        warmup=opts.warmup,
        modes=modes,
        progress=not opts.no_progress,
        with_collectives=not opts.no_collectives,
        argv=list(argv),
    )
    _output(opts, rep, text, plot.plot_layer)
    return rep


def _pick(p: argparse.ArgumentParser, raw: str, known: Collection[str], what: str) -> list[str]:
    """The comma-separated entries of `raw`, each one of `known` (else argparse's usage error)."""
    items = [v for v in raw.split(",") if v]
    bad = [v for v in items if v not in known]
    if bad:
        p.error(f"unknown {what} {bad}; choose from {', '.join(known)}")
    return items


def model_main(argv: Sequence[str]) -> dict[str, Any] | None:
    """``python -m benchmarks model``: the whole-model benchmark."""
    from benchmarks import model, plot, report

    p = argparse.ArgumentParser(
        prog="python -m benchmarks model",
        description="Time a ResNet training step with each batch norm swapped in; BN's in-context cost from the HLO.",
    )
    _common(p, model.IMPLS, "default 9; --quick 2")
    default = ",".join(f"{c.arch}:{c.batch}:{c.image}:{c.width}" for c in grid.MODEL_GRID)
    p.add_argument("--configs", help=f"comma-separated arch:batch:image:width (default {default})")
    p.add_argument(
        "--placements", default=",".join(grid.PLACEMENTS), help="comma-separated: " + ", ".join(grid.PLACEMENTS)
    )
    p.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--compile-only", action="store_true",
        help="print the deterministic costs (kernels, collectives, bytes, BN in context) as JSON rows; no timing",
    )
    opts = p.parse_args(list(argv))

    def text(rep: dict[str, Any], markdown: bool) -> str:
        return report.format_model(rep, markdown)

    if opts.from_json:
        saved = _load(opts.from_json, "model")
        print(text(saved, opts.markdown))
        return saved
    placements = _pick(p, opts.placements, grid.PLACEMENTS, "placement(s)")
    cases = (
        model.parse_configs(opts.configs)
        if opts.configs
        else list(grid.QUICK_MODEL_GRID if opts.quick else grid.MODEL_GRID)
    )
    dtypes = [d for d in opts.dtypes.split(",") if d]
    impls = [i for i in opts.impls.split(",") if i]
    reps = opts.reps if opts.reps is not None else (2 if opts.quick else 9)
    if opts.compile_only:
        print(json.dumps(model.costs(cases, placements, dtypes, impls)))
        return None
    if opts.rows_only:
        from benchmarks.timing import progress

        print(json.dumps(model.run_here(cases, placements, dtypes, impls, reps, opts.warmup, progress(0, False))))
        return None
    rep = model.run(cases, placements, dtypes, impls, reps, opts.warmup, not opts.no_progress, list(argv))
    _output(opts, rep, text, plot.plot_model)
    return rep


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Dispatches to the part named first in `argv` (default: ``layer``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    part = args[0] if args and args[0] in PARTS else "layer"
    rest = args[1:] if args and args[0] in PARTS else args
    if part == "model":
        return model_main(rest)
    if part == "figures":
        from benchmarks.figures import main as figures_main

        return figures_main(rest)
    if part == "render":
        from benchmarks.render import main as render_main

        render_main(rest)
        return None
    if part == "collectives":
        from benchmarks.collectives import main as collectives_main

        collectives_main(rest)
        return None
    if part == "compile":
        from benchmarks.compile import main as compile_main

        return compile_main(rest)
    if part == "gpu":
        from benchmarks.gpu import main as gpu_main

        return gpu_main(rest)
    return layer_main(rest)


if __name__ == "__main__":
    main()
