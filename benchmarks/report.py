"""Reports of the benchmarks: run metadata, plain-text and Markdown tables (layer and whole-model).

The reports are plain dicts (what `--json` prints): `meta` (machine, date,
versions, command, load), `config`, `implementations`, `results` (one row per
timed program) and `summary`; `format_*` print them, from a run or from a
saved JSON (`--from-json`).
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import jax

from benchmarks.hlo import KINDS
from benchmarks.layers import MODE_TITLES
from benchmarks.timing import geomean, quartiles

#: A report as `--json` prints it (nested dicts and lists of JSON values).
Report: TypeAlias = Mapping[str, Any]


def metadata(program: str, argv: Sequence[str]) -> dict[str, object]:
    """Machine, date, versions, load average and the command line."""
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "haiku", "equinox", "numpy", "jaxbn"):
        try:
            versions[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except ImportError:
            versions[mod] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([program, *argv]),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)),
            "devices": jax.device_count(),
            "python": platform.python_version(),
        },
        "versions": versions,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def geomean_spread(report: Report, mode: str, dtype: str, impl: str) -> tuple[float, float, float] | None:
    """Geometric-mean speedup of `impl` vs flax over the grid rows of `mode` and `dtype` ("all": every dtype).

    Returns:
      (geomean of the per-row median speedups, 25th and 75th percentiles of the
      per-round geomeans: round r's geomean over rows of flax's r-th time / `impl`'s
      r-th time, the rounds of one row being interleaved), or None without such rows.
    """
    rows = report["results"]
    index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    pairs = [
        (index[(r["case"], r["dtype"], mode, "flax")], r)
        for r in rows
        if r["mode"] == mode and r["impl"] == impl and dtype in ("all", r["dtype"])
        and (r["case"], r["dtype"], mode, "flax") in index
    ]  # fmt: skip
    if not pairs:
        return None
    geo = geomean([ref["median_ms"] / r["median_ms"] for ref, r in pairs])
    rounds = min(len(r["times_ms"]) for pair in pairs for r in pair)
    per_round = [geomean([ref["times_ms"][i] / r["times_ms"][i] for ref, r in pairs]) for i in range(rounds)]
    lo, hi = quartiles([g for g in per_round if g is not None])
    return (float(geo), lo, hi) if geo is not None else None


def _spread(report: Report, mode: str, dtype: str, impl: str) -> str:
    g = geomean_spread(report, mode, dtype, impl)
    return "-" if g is None else f"{g[0]:.2f}x ({g[1]:.2f}-{g[2]:.2f})"


def _header(report: Report) -> list[str]:
    meta = report["meta"]
    m, v = meta["machine"], meta["versions"]
    load = ", ".join(f"{a:.1f}" for a in (meta.get("loadavg_start") or [])[:1] + (meta.get("loadavg_end") or [])[:1])
    return [
        f"{meta['date_utc']}  {m['cpu']} ({m['cpu_count']} cpus, {m['backend']})  jax {v['jax']}  flax {v['flax']}"
        f"  load (1 min) start, end: {load}",
        f"command: {meta['command']}",
    ]


# ------------------------------------------------------------------ layer benchmark


def _layer_index(report: Report) -> tuple[dict[tuple[str, str, str, str], Any], list[tuple[str, str]], dict[str, str]]:
    rows = report["results"]
    index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    cases = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    labels = {r["case"]: f"{r['layout']} {'x'.join(map(str, r['shape']))}" for r in rows}
    return index, cases, labels


def format_layer(report: Report) -> str:
    """The layer benchmark's human-readable tables."""
    names = report["implementations"]
    index, cases, labels = _layer_index(report)
    cfg, summary = report["config"], report["summary"]
    out = ["benchmarks layer", *_header(report)]
    out.append(
        f"median of {cfg['reps']} interleaved reps after {cfg['warmup']} warm-up; "
        "cell = ms (speedup vs flax = flax ms / ms, > 1 is faster); 'best anchor' = fastest non-jaxbn ms / "
        "jaxbn ms; geomean rows: geometric mean of the speedups (25-75% range of the per-round geomeans)"
    )
    w0 = max([len(labels[c]) + 10 for c, _ in cases] + [24])
    for mode in dict.fromkeys(r["mode"] for r in report["results"]):
        out += ["", f"== {mode}: {MODE_TITLES[mode]} =="]
        head = f"{'shape':<{w0}}" + "".join(f"{n:>24}" for n in names) + f"{'best anchor':>13}"
        if mode == "train+grad":
            head += f"{'XLA passes jaxbn/flax':>22}"
        out += [head, "-" * len(head)]
        for case, dt in cases:
            cells = []
            for n in names:
                r = index.get((case, dt, mode, n))
                cell = "-" if r is None else f"{r['median_ms']:.2f} ({_x(r['speedup_vs_flax']):>6})"
                cells.append(f"{cell:>24}")
            jb = index.get((case, dt, mode, "jaxbn"))
            mark = " <" if jb and jb["vs_best_anchor"] is not None and jb["vs_best_anchor"] < 1 / 1.05 else ""
            best = _x(jb["vs_best_anchor"]) if jb else "-"
            extra = f"{_bytes_passes(index, case, dt, mode):>20}" if mode == "train+grad" else ""
            out.append(f"{labels[case] + ' ' + dt:<{w0}}" + "".join(cells) + f"{best + mark:>13}" + extra)
        for dt in summary["geomean_speedup_vs_flax"][mode]:
            out.append(
                f"{'geomean speedup ' + dt:<{w0}}" + "".join(f"{_spread(report, mode, dt, n):>24}" for n in names)
            )
    dts = list(dict.fromkeys(r["dtype"] for r in report["results"]))
    out += ["", "== memory kept for the backward pass: batch-sized residuals of jax.vjp, multiple of x's bytes =="]
    out.append(f"{'implementation':<14}" + "".join(f"{d:>12}" for d in dts))
    for n in names:
        out.append(
            f"{n:<14}" + "".join(f"{summary['residual_multiple'].get(n, {}).get(d, float('nan')):>11.2f}x" for d in dts)
        )
    out += _collectives_lines(report.get("collectives"), markdown=False)
    if report["skipped"]:
        out += ["", *(f"skipped {n}: {why}" for n, why in report["skipped"].items())]
    t = summary["targets"]
    out += [
        "",
        "targets:",
        f"  train+grad geomean speedup vs flax >= 1.25: {t['train+grad geomean speedup vs flax >= 1.25']}",
        f"  jaxbn rows slower than the fastest anchor by > 5% (marked <): "
        f"{len(t['jaxbn rows slower than the fastest anchor by > 5%'])}",
        f"  jaxbn residuals <= 1.0x input: {t['jaxbn residuals <= 1.0x input']}",
    ]
    return "\n".join(out)


def _collectives_lines(coll: Mapping[str, Any] | None, markdown: bool) -> list[str]:
    if not coll:
        return []
    title = f"collectives in a synchronized train+grad step (shard_map over {coll['devices']} devices, compiled HLO)"
    if "error" in coll:
        return ["", f"{title}: not measured: {coll['error']}"]
    if markdown:
        out = ["", f"**Collectives** in a synchronized train+grad step ({coll['devices']} devices, compiled HLO):", ""]
        out += ["| implementation | " + " | ".join(KINDS) + " | total |", "|---|" + "---:|" * (len(KINDS) + 1)]
        for n, c in coll["counts"].items():
            if "error" in c:
                out.append(f"| {n} | not measured: {c['error']} |" + " |" * len(KINDS))
            else:
                out.append(f"| {n} | " + " | ".join(str(c.get(k, 0)) for k in KINDS) + f" | {sum(c.values())} |")
        return out
    out = ["", f"== {title} ==", f"{'implementation':<14}" + "".join(f"{k:>20}" for k in KINDS) + f"{'total':>8}"]
    for n, c in coll["counts"].items():
        if "error" in c:
            out.append(f"{n:<14}not measured: {c['error']}")
        else:
            out.append(f"{n:<14}" + "".join(f"{c.get(k, 0):>20}" for k in KINDS) + f"{sum(c.values()):>8}")
    return out


def _bytes_passes(index: Mapping[tuple[str, str, str, str], Any], case: str, dt: str, mode: str) -> str:
    """XLA's bytes accessed over x's bytes, "jaxbn / flax" (floor 8 for a two-pass train+grad)."""
    cells = []
    for n in ("jaxbn", "flax"):
        r = index.get((case, dt, mode, n))
        cells.append("-" if r is None or r.get("bytes_passes") is None else f"{r['bytes_passes']:.2f}")
    return " / ".join(cells)


def markdown_layer(report: Report) -> str:
    """The layer benchmark as Markdown tables (what docs/benchmark.md shows)."""
    names = report["implementations"]
    index, cases, labels = _layer_index(report)
    summary = report["summary"]
    out = []
    for mode in dict.fromkeys(r["mode"] for r in report["results"]):
        out.append(
            f"**{mode}**: {MODE_TITLES[mode]}. Median ms over {report['config']['reps']} interleaved rounds "
            "(speedup vs flax); geomean rows: geometric mean of the speedups (25-75% range of the per-round "
            "geomeans).\n"
        )
        passes = mode == "train+grad"
        out.append(
            "| shape | dtype | " + " | ".join(names) + " | jaxbn vs best anchor |"
            + (" XLA passes over x: jaxbn / flax |" if passes else "")
        )
        out.append("|---|---|" + "---:|" * (len(names) + 1 + passes))
        for case, dt in cases:
            cells = []
            for n in names:
                r = index.get((case, dt, mode, n))
                cells.append("-" if r is None else f"{r['median_ms']:.2f} ({_x(r['speedup_vs_flax'])})")
            jb = index.get((case, dt, mode, "jaxbn"))
            best = "-" if jb is None else _x(jb["vs_best_anchor"])
            if jb and jb["vs_best_anchor"] is not None and jb["vs_best_anchor"] < 1 / 1.05:
                best = f"**{best}**"
            extra = f" {_bytes_passes(index, case, dt, mode)} |" if passes else ""
            out.append(f"| {labels[case]} | {dt} | " + " | ".join(cells) + f" | {best} |" + extra)
        for dt in summary["geomean_speedup_vs_flax"][mode]:
            out.append(
                f"| geomean | {dt} | " + " | ".join(_spread(report, mode, dt, n) for n in names) + " | |"
                + (" |" if passes else "")
            )
        out.append("")
    dts = list(dict.fromkeys(r["dtype"] for r in report["results"]))
    out += ["**Residuals** kept for the backward pass (batch-sized arrays, multiple of x's bytes):", ""]
    out += ["| implementation | " + " | ".join(dts) + " |", "|---|" + "---:|" * len(dts)]
    for n in names:
        out.append(
            f"| {n} | "
            + " | ".join(f"{summary['residual_multiple'].get(n, {}).get(d, float('nan')):.2f}x" for d in dts)
            + " |"
        )
    out += ["", "**HLO** of the train+grad programs: kernels / full-size passes over x (deterministic):", ""]
    out += ["| shape | dtype | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for case, dt in cases:
        cells = []
        for n in names:
            r = index.get((case, dt, "train+grad", n))
            cells.append("-" if r is None else f"{r['kernels']} / {r['full_size_passes']:.1f}")
        out.append(f"| {labels[case]} | {dt} | " + " | ".join(cells) + " |")
    out += _collectives_lines(report.get("collectives"), markdown=True)
    return "\n".join(out)


# ------------------------------------------------------------------ whole-model benchmark

_MIB = 2**20


def _positive(v: float | None) -> float | None:
    """`v` if it is a positive ratio, else None (BN's temp bytes, a difference of two steps', can be <= 0)."""
    return v if v is not None and v > 0 else None


def _model_groups(report: Report) -> list[tuple[str, str, str]]:
    return list(dict.fromkeys((r["model"], r["placement"], r["dtype"]) for r in report["results"]))


def format_model(report: Report, markdown: bool = False, targets: bool = True) -> str:
    """The whole-model benchmark's table, plain text or Markdown.

    Per row: median step ms, speedup vs flax (flax ms / ms) with the 25-75%
    range of the per-round ratios, compile s, temp MiB, and BN's in-context
    cost (this step minus the identity step): ms, bytes accessed (MiB and
    ratio to flax's), kernels, temp MiB (ratio to flax's). `targets`: the
    target checks after the table.
    """
    cols = [
        "model", "placement", "dtype", "impl", "step ms", "vs flax", "(25-75%)", "compile s", "temp MiB",
        "BN ms", "BN MiB accessed", "BN kernels", "BN temp MiB", "collectives",
    ]  # fmt: skip
    rows = []
    for r in report["results"]:
        bn = r.get("bn")
        rows.append([
            r["model"], r["placement"], r["dtype"], r["impl"], f"{r['median_ms']:.1f}", _x(r["speedup_vs_flax"]),
            "-" if r.get("speedup_iqr") is None else f"{r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f}",
            f"{r['compile_s']:.1f}", f"{r['temp_bytes'] / _MIB:.2f}",
            "-" if bn is None else f"{bn['ms']:.1f}",
            "-" if bn is None else f"{bn['bytes_accessed'] / _MIB:.1f} ({_x(bn['bytes_vs_flax'])})",
            "-" if bn is None else f"{bn['kernels']} ({_x(bn['kernels_vs_flax'])})",
            "-" if bn is None else f"{bn['temp_bytes'] / _MIB:.2f} ({_x(_positive(bn['temp_vs_flax']))})",
            str(sum(r["collectives"].values())),
        ])  # fmt: skip
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * 4 + "---:|" * (len(cols) - 4)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)] if rows else []
        out = ["benchmarks model", *_header(report)]
        out.append(
            f"median of {report['config']['reps']} interleaved reps; vs flax = flax step ms / step ms (> 1 faster); "
            "BN = this step minus the identity (no BN) step"
        )
        out += ["", "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
        out += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    if not targets:
        return "\n".join(out)
    misses = report["summary"]["targets"]
    out += [
        "",
        "targets (jaxbn.linen vs flax, every row):" if not markdown else "**Targets** (jaxbn.linen vs flax):",
        "",
    ]
    for name, missed in misses.items():
        out.append(f"{'- ' if markdown else '  '}{name}: {'met' if not missed else 'missed on ' + '; '.join(missed)}")
    if report.get("skipped"):
        out += ["", *(f"skipped {n}: {why}" for n, why in report["skipped"].items())]
    return "\n".join(out)
