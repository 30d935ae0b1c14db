"""Bar charts of the benchmark reports (matplotlib required)."""

from __future__ import annotations

import numpy as np

from benchmarks.layers import MODE_TITLES
from benchmarks.report import Report


def _figure(panels: int, groups: int) -> tuple[object, np.ndarray]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(panels, 1, figsize=(max(8, 1.1 * groups), 3.2 * panels), squeeze=False)  # type: ignore[no-any-return]


def _bars(ax: object, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(labels)) + i * width, vals, width, label=name)  # type: ignore[attr-defined]
    ax.axhline(1.0, color="k", lw=0.8)  # type: ignore[attr-defined]
    ax.set_xticks(np.arange(len(labels)) + width * (len(series) - 1) / 2)  # type: ignore[attr-defined]
    ax.set_xticklabels(labels, fontsize=7)  # type: ignore[attr-defined]
    ax.set_ylabel(ylabel)  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=9)  # type: ignore[attr-defined]
    ax.legend(fontsize=7, ncol=len(series))  # type: ignore[attr-defined]


def plot_layer(report: Report, path: str) -> None:
    """Speedup vs flax per grid row, one panel per mode, written as a PNG to `path`."""
    import matplotlib.pyplot as plt

    names, rows = report["implementations"], report["results"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    cases = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    fig, axes = _figure(len(modes), len(cases))
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        series = {
            n: [
                (index[(c, d, mode, n)]["speedup_vs_flax"] or 0.0) if (c, d, mode, n) in index else 0.0
                for c, d in cases
            ]
            for n in names
        }
        _bars(ax, [f"{c}\n{d}" for c, d in cases], series, "speedup vs flax", MODE_TITLES[mode])
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=120)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]


def plot_model(report: Report, path: str) -> None:
    """Whole-model step speedup vs flax and in-context BN bytes vs flax's, per group, written as a PNG."""
    import matplotlib.pyplot as plt

    rows = report["results"]
    names = [n for n in report["implementations"] if n != "identity"]
    groups = list(dict.fromkeys((r["model"], r["placement"], r["dtype"]) for r in rows))
    index = {(r["model"], r["placement"], r["dtype"], r["impl"]): r for r in rows}
    labels = [f"{m.split()[0]}\n{p}\n{d}" for m, p, d in groups]
    fig, axes = _figure(2, len(groups))
    step = {n: [index[(*g, n)]["speedup_vs_flax"] or 0.0 if (*g, n) in index else 0.0 for g in groups] for n in names}
    _bars(axes[0, 0], labels, step, "step speedup vs flax", "whole training step: flax ms / ms")
    bn = {
        n: [((index[(*g, n)].get("bn") or {}).get("bytes_vs_flax") or 0.0) if (*g, n) in index else 0.0 for g in groups]
        for n in names
    }
    _bars(axes[1, 0], labels, bn, "BN bytes / flax's", "in-context BN bytes accessed (step - identity step), vs flax")
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=120)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
