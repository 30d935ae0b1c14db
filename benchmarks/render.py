"""README.md's and docs/benchmark.md's figures, written from the figures JSON: ``python -m benchmarks render``.

Two kinds of places hold figures, and nothing else is touched:

* **rows** of a Markdown table whose first cell starts with a hidden tag,
  ``| <!-- fig:NAME --> ...``: the whole row is rewritten (`ROWS`); rows without a
  tag (prose rows) stay as they are written;
* **blocks** between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``
  on lines of their own: the lines between them are rewritten (`BLOCKS`).

`render_text` is pure (text in, text out), so a test can render in memory and
compare with the files; ``--check`` does the same from the command line.

>>> render_text("a\\n<!-- figures:x -->\\nold\\n<!-- /figures:x -->\\n", {}, blocks={"x": lambda f: "new"})
'a\\n<!-- figures:x -->\\nnew\\n<!-- /figures:x -->\\n'
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from benchmarks import report
from benchmarks.figures import FIGURES_JSON, ROOT

Figures = Mapping[str, Any]
#: The files rendered, relative to the repository root.
FILES = ("README.md", os.path.join("docs", "benchmark.md"), os.path.join("docs", "sync.md"))

_ROW_RE = re.compile(r"^\|\s*<!-- fig:(?P<name>[\w-]+) -->.*$", re.M)
_BLOCK_RE = re.compile(r"^<!-- figures:(?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /figures:(?P=name) -->$", re.M | re.S)


class RenderError(ValueError):
    """A tag names no renderer, or the figures lack what a tag needs."""


def _x(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def _num(v: float) -> str:
    """2 decimals at most, trailing zeros dropped: 1.0 -> '1', 2.5 -> '2.5', 1.25 -> '1.25'."""
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _sci(v: float) -> str:
    """One significant decimal in scientific notation: 4.1e-7."""
    mant, exp = f"{v:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def _part(fig: Figures, name: str) -> Any:
    if name not in fig:
        raise RenderError(f"the figures have no {name!r} part (run: python -m benchmarks figures --parts {name})")
    return fig[name]


# ------------------------------------------------------------------ README comparison-table rows


def _row(name: str, cells: Sequence[str]) -> str:
    return f"| <!-- fig:{name} --> " + " | ".join(cells) + " |"


def _values(vals: Sequence[float]) -> str:
    finite = [v for v in vals if math.isfinite(v)]
    return "{" + ", ".join(_num(v) for v in finite) + "}"


def row_offset_var(fig: Figures) -> list[str]:
    """Batch variance of float32 ``1e4 + N(0, 1)``, per library, over seeds."""
    c = _part(fig, "claims")["offset_variance"]
    lo, hi = c["true_var_range"]
    label = (
        f"float32 `1e4 + N(0, 1)`, the example above over {c['seeds']} seeds (true var {lo:.2f} to {hi:.2f}): "
        "the batch variance"
    )
    jb = c["jaxbn"]
    cells = [label, f"to {_sci(jb['max_rel_error'])} relative ({_sci(jb['max_rel_error_masked'])} with a mask)"]
    for name in ("flax", "haiku"):
        r = c.get(name)
        if r is None:
            cells.append("not installed")
            continue
        vals = "var ∈ " + _values(r["values"]) if r["values"] is not None else f"off by up to {r['max_rel_error']:.0f}x"
        nan = f"; {100 * r['nan_outputs'] / r['outputs']:.0f}% of outputs NaN" if r["nan_outputs"] else ""
        cells.append(vals + (" (default settings)" if name == "flax" else "") + nan)
    eq = c.get("equinox")
    cells.append("not installed" if eq is None else f"correct: to {_sci(eq['max_rel_error'])} relative")
    return cells


def row_batch_ema(fig: Figures) -> list[str]:
    """The variance `mode="batch"` layers use in inference, next to the data's and the EMA."""
    c = _part(fig, "claims")["batch_mode_ema"]
    m, k = c["momentum"], c["steps"]
    label = (
        f'`mode="batch"`-style inference variance after {k} steps at momentum {m} on batches of '
        f"{c['batch']} from N(1, 3²): data variance {_num(c['data_var'])}, mean batch variance "
        f"{c['mean_batch_var']:.2f}, their EMA from 1 (not debiased) {c['ema']:.2f}"
    )
    eq = c.get("equinox")
    eq_cell = (
        "not installed"
        if eq is None
        else f"**{eq:.2f}**: the EMA divided by `1 - {m}**{k}`; the initial 1 alone adds "
        f"`{m}**{k} / (1 - {m}**{k})` = +{c['debias_excess']:.2f}"
    )
    ours = c.get("jaxbn.equinox", c["jaxbn.linen"])
    return [label, f"the EMA: {ours:.2f}", f"the EMA: {c['flax']:.2f}", "—", eq_cell]


def row_collectives(fig: Figures) -> list[str]:
    """Collectives of one synchronized layer's training step (fwd + bwd), per library."""
    coll = _part(fig, "layer").get("collectives") or {}
    if "counts" not in coll:
        raise RenderError(f"the layer part has no collective counts: {coll.get('error', 'not measured')}")
    counts = coll["counts"]

    def total(name: str) -> str:
        c = counts.get(name)
        return "—" if c is None or "error" in c else str(sum(c.values()))

    label = f"collectives per synchronized train step (fwd + bwd; one layer on {coll['devices']} devices, compiled HLO)"
    return [label, total("jaxbn"), f"{total('flax')} (fast variance) / {total('flax-exact')}", total("haiku"),
            total("equinox")]  # fmt: skip


def row_residuals(fig: Figures) -> list[str]:
    """Batch-sized residuals kept for the backward pass, multiple of x's bytes, float32 / bf16."""
    res = _part(fig, "layer")["summary"]["residual_multiple"]

    def cell(name: str) -> str:
        r = res.get(name)
        return "—" if r is None else " / ".join(_num(r[d]) for d in ("float32", "bfloat16") if d in r)

    label = "memory kept for the backward pass (× `x`'s bytes; `jax.vjp`'s residuals, deterministic), float32 / bf16"
    return [label, f"**{cell('jaxbn')}**",
            cell("flax"), cell("haiku"), cell("equinox")]  # fmt: skip


def row_layer_speed(fig: Figures) -> list[str]:
    """Geometric-mean train-step speed vs flax over the layer grid, float32 / bf16, with the per-round spread."""
    rep = _part(fig, "layer")
    shapes = len({r["case"] for r in rep["results"]})

    def cell(name: str) -> str:
        parts = []
        for dt in ("float32", "bfloat16"):
            g = report.geomean_spread(rep, "train+grad", dt, name)
            parts.append("-" if g is None else f"{g[0]:.2f}x ({g[1]:.2f}-{g[2]:.2f})")
        return " / ".join(parts)

    label = (
        f"one layer's train step (fwd + bwd) speed vs flax, geometric mean over {shapes} shapes, float32 / bf16 "
        f"(25-75% range over {rep['config']['reps']} interleaved rounds)"
    )
    return [label, cell("jaxbn") + " ([benchmark](docs/benchmark.md))", "1 / 1", cell("haiku"), cell("equinox")]


def _placement(p: str) -> str:
    return "1 device" if p == "1dev" else f"8 devices, {p}"


def row_in_context(fig: Figures) -> list[str]:
    """BN's in-context bytes and kernels vs flax's, jaxbn.linen in a ResNet step, every placement."""
    rep = _part(fig, "model")
    rows = [r for r in rep["results"] if r["impl"] == "jaxbn.linen" and r["dtype"] == "float32" and r.get("bn")]
    if not rows:
        raise RenderError("the model part has no float32 jaxbn.linen row")
    cells = [f"{_placement(r['placement'])}: {_x(r['bn']['bytes_vs_flax'])}, {_x(r['bn']['kernels_vs_flax'])}"
             for r in rows]  # fmt: skip
    label = (
        f"batch norm's cost inside a {rows[0]['model']} training step, float32: bytes accessed, kernels vs "
        "flax's (deterministic, from the compiled HLO)"
    )
    return [label, "; ".join(cells) + " ([in context](docs/benchmark.md))", "1, 1", "—", "—"]


def row_bf16(fig: Figures) -> list[str]:
    """The running statistics' dtype for bfloat16 input, and what strict dtype promotion does."""
    st = _part(fig, "claims")["state"]

    def cell(name: str) -> str:
        r = st.get(name)
        if r is None:
            return "not installed"
        dt = r["bf16_state_dtype"]
        text = f"**{dt}**" if dt != "float32" else dt
        return text + ("" if r["bf16_strict"] == dt else f" (strict promotion: `{r['bf16_strict']}`)")

    label = "bf16 input: dtype of the running statistics after a training step"
    return [label, cell("jaxbn"), cell("flax"), cell("haiku"), cell("equinox")]


def row_nonfinite(fig: Figures) -> list[str]:
    """What a batch with one inf leaves in the running variance, and whether a finite batch repairs it."""
    st = _part(fig, "claims")["state"]

    def cell(name: str) -> str:
        r = st.get(name)
        if r is None:
            return "not installed"
        a, b = r["inf_var"], r["inf_then_clean_var"]
        if math.isnan(a) and math.isnan(b):
            return "**NaN**, still NaN after a finite batch"
        return ("NaN" if math.isnan(a) else _num(a)) + ", then " + ("NaN" if math.isnan(b) else _num(b))

    label = (
        "a batch with one `inf` (e.g. an overflowing bf16 step): the running variance (starting at 1) after it, "
        "then after one finite batch"
    )
    return [label, cell("jaxbn"), cell("flax"), cell("haiku"), cell("equinox")]


#: README.md table rows: tag name -> the row's cells.
ROWS: dict[str, Callable[[Figures], list[str]]] = {
    "offset-var": row_offset_var,
    "batch-ema": row_batch_ema,
    "collectives": row_collectives,
    "residuals": row_residuals,
    "bf16": row_bf16,
    "nonfinite": row_nonfinite,
    "layer-speed": row_layer_speed,
    "in-context": row_in_context,
}


# ------------------------------------------------------------------ docs/benchmark.md blocks


def block_meta(fig: Figures) -> str:
    """Where and when the figures were measured."""
    meta = fig["meta"]
    m, v = meta["machine"], meta["versions"]
    commit = meta.get("commit") or "unknown"
    state = " with uncommitted changes" if meta.get("dirty") else ""
    libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "jaxlib", "flax", "optax", "equinox", "haiku", "numpy") if v.get(k))
    load = meta.get("loadavg_start") or []
    quick = "\n\n**A `--quick` run: a smoke test of the machinery, not a measurement.**" if meta.get("quick") else ""
    return (
        f"Measured at commit `{commit[:12]}`{state} on {meta['date_utc']} by `python -m benchmarks figures`: "
        f"{m['cpu']}, {m['cpu_count']} CPUs ({m['backend']} backend, {m['devices']} device(s): {m['device']}), "
        f"Python {m['python']}, {libs}; load average at the start {load[0] if load else '?'}. "
        f"Figures: [`docs/figures.json`](figures.json).{quick}"
    )


def block_layer(fig: Figures) -> str:
    """The layer benchmark: geometric means of every mode, then the `train+grad` tables in full."""
    rep = _part(fig, "layer")
    names = rep["implementations"]
    out = [
        f"Geometric mean speedup vs flax over the grid (25-75% range of the per-round geomeans, "
        f"{rep['config']['reps']} interleaved rounds):",
        "",
        "| mode | dtype | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for mode in rep["config"]["modes"]:
        for dt in [*rep["config"]["dtypes"], "all"]:
            cells = []
            for n in names:
                g = report.geomean_spread(rep, mode, dt, n)
                cells.append("-" if g is None else f"{g[0]:.2f}x ({g[1]:.2f}-{g[2]:.2f})")
            out.append(f"| {mode} | {dt} | " + " | ".join(cells) + " |")
    grad = {**rep, "results": [r for r in rep["results"] if r["mode"] == "train+grad"], "collectives": None}
    return "\n".join(out) + "\n\n" + report.markdown_layer(grad)


def block_model(fig: Figures) -> str:
    """The whole-model benchmark's table."""
    return report.format_model(_part(fig, "model"), markdown=True, targets=False)


def block_collectives(fig: Figures) -> str:
    """The collectives of one synchronized layer, jaxbn's strategies next to flax's."""
    out = ["| implementation | devices | collectives | by kind (bytes per device) |", "|---|---:|---:|---|"]
    for rows in _part(fig, "collectives").values():
        for r in rows:
            kinds = ", ".join(f"{c} {k} ({r['bytes'][k]} B)" for k, c in r["counts"].items() if c)
            out.append(f"| {r['impl']} | {r['devices']} | {sum(r['counts'].values())} | {kinds or '-'} |")
    return "\n".join(out)


def block_claims(fig: Figures) -> str:
    """The README comparison table's measured rows, with every number they come from."""
    c = _part(fig, "claims")
    ov, be = c["offset_variance"], c["batch_mode_ema"]
    out = [
        f"Batch variance of float32 `1e4 + N(0, 1)`, shape {'x'.join(map(str, ov['shape']))}, seeds 0 to "
        f"{ov['seeds'] - 1} (true variance {ov['true_var_range'][0]:.3f} to {ov['true_var_range'][1]:.3f}):",
        "",
        "| library | largest relative error | variances returned | NaN outputs |",
        "|---|---:|---|---:|",
    ]
    for name in ("jaxbn", "flax", "haiku", "equinox"):
        r = ov.get(name)
        if r is None:
            continue
        vals = "-" if r["values"] is None else _values(r["values"])
        out.append(f"| {name} | {_sci(r['max_rel_error'])} | {vals} | {r['nan_outputs']} of {r['outputs']} |")
    out += [
        "",
        f"Inference variance after {be['steps']} training steps at momentum {be['momentum']} on batches of "
        f"{be['batch']} examples from N(1, 3²), {be['channels']} channels (means over channels):",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| the data's variance | {be['data_var']:.2f} |",
        f"| mean of the (biased) batch variances | {be['mean_batch_var']:.3f} |",
        f"| their EMA from 1, not debiased (flax's and PyTorch's rule) | {be['ema']:.3f} |",
        f"| that EMA divided by `1 - {be['momentum']}**{be['steps']}` | {be['ema_debiased']:.3f} |",
        f"| of which the initial 1 contributes `m**k / (1 - m**k)` | {be['debias_excess']:.3f} |",
    ]
    for name in ("flax", "jaxbn.linen", "equinox", "jaxbn.equinox"):
        if name in be:
            out.append(f"| {name}: variance used in inference | {be[name]:.3f} |")
    st = c.get("state", {})
    out += [
        "",
        "Running variance's dtype after a step on bfloat16 input (standard / strict promotion), and channel 0's "
        "running variance after a batch with one `inf` in it, then after one more finite batch (momentum 0.9):",
        "",
        "| library | bf16 input | strict promotion | after the `inf` batch | then after a finite one |",
        "|---|---|---|---:|---:|",
    ]
    out += [
        f"| {n} | {r['bf16_state_dtype']} | {r['bf16_strict']} | {r['inf_var']:.4g} | {r['inf_then_clean_var']:.4g} |"
        for n, r in st.items()
    ]
    return "\n".join(out)


def block_costs(fig: Figures) -> str:
    """docs/sync.md's whole-step table: kernels, collectives and BN bytes, flax vs jaxbn.linen."""
    rows = _part(fig, "costs")
    by = {(r["model"], r["placement"], r["dtype"], r["impl"]): r for r in rows}
    out = [
        "| model | placement | dtype | kernels: flax / jaxbn (BN only) | collectives: flax / jaxbn "
        "| BN bytes accessed, jaxbn / flax |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (model, placement, dtype, impl), j in by.items():
        f = by.get((model, placement, dtype, "flax"))
        if impl != "jaxbn.linen" or f is None or not j.get("bn") or not f.get("bn"):
            continue
        out.append(
            f"| {model} | {_placement(placement)} | {dtype} | {f['kernels']} / {j['kernels']} "
            f"({f['bn']['kernels']} / {j['bn']['kernels']}) | {sum(f['collectives'].values())} / "
            f"{sum(j['collectives'].values())} | {_x(j['bn']['bytes_accessed_vs_flax'])} |"
        )
    return "\n".join(out)


def block_compile(fig: Figures) -> str:
    """What batch norm costs to trace, lower and compile in a ResNet step, jaxbn vs flax (`benchmarks.compile`)."""
    from benchmarks import compile as compile_cost

    return compile_cost.markdown(_part(fig, "compile"))


#: docs/benchmark.md's and docs/sync.md's blocks: tag name -> the block's Markdown.
BLOCKS: dict[str, Callable[[Figures], str]] = {
    "costs": block_costs,
    "compile": block_compile,
    "meta": block_meta,
    "layer": block_layer,
    "model": block_model,
    "collectives": block_collectives,
    "claims": block_claims,
}


# ------------------------------------------------------------------ rendering


def render_text(
    text: str,
    fig: Figures,
    rows: Mapping[str, Callable[[Figures], list[str]]] = ROWS,
    blocks: Mapping[str, Callable[[Figures], str]] = BLOCKS,
) -> str:
    """`text` with every tagged row and block rewritten from `fig`.

    Raises:
      RenderError: a tag that `rows` / `blocks` does not know, or figures missing a part a tag needs.
    """

    def row(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in rows:
            raise RenderError(f"unknown figure row tag {name!r}; known: {', '.join(rows)}")
        return _row(name, rows[name](fig))

    def block(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in blocks:
            raise RenderError(f"unknown figure block tag {name!r}; known: {', '.join(blocks)}")
        return f"<!-- figures:{name} -->\n{blocks[name](fig).rstrip()}\n<!-- /figures:{name} -->"

    return _BLOCK_RE.sub(block, _ROW_RE.sub(row, text))


def load(path: str | None = None) -> dict[str, Any]:
    """The figures JSON (default: `FIGURES_JSON` under the repository root)."""
    with open(path or os.path.join(ROOT, FIGURES_JSON), encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


def render_files(fig: Figures, root: str = ROOT, files: Sequence[str] = FILES) -> dict[str, tuple[str, str]]:
    """``{path: (current text, rendered text)}`` for every file in `files`."""
    out = {}
    for rel in files:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            text = f.read()
        out[rel] = (text, render_text(text, fig))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks render [--check] [--json PATH]``: writes (or checks) README.md and docs/benchmark.md."""
    p = argparse.ArgumentParser(prog="python -m benchmarks render", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=os.path.join(ROOT, FIGURES_JSON), help=f"figures JSON (default {FIGURES_JSON})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs from its rendering")
    p.add_argument("--allow-quick", action="store_true", help="render a --quick run's figures (never for publishing)")
    opts = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    fig = load(opts.json)
    if fig["meta"].get("quick") and not opts.allow_quick:
        p.error(f"{opts.json} comes from a --quick run (a smoke test): measure with python -m benchmarks figures")
    stale = []
    for rel, (old, new) in render_files(fig).items():
        if old == new:
            continue
        stale.append(rel)
        if opts.check:
            sys.stdout.writelines(
                difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel, rel + " (rendered)")
            )
        else:
            with open(os.path.join(ROOT, rel), "w", encoding="utf-8") as f:
                f.write(new)
    print(
        ("differ from the figures: " if opts.check else "rendered: ") + (", ".join(stale) or "nothing"), file=sys.stderr
    )
    if opts.check and stale:
        raise SystemExit(1)
    return 0
