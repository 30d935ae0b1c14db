"""What jaxbn's XLA tricks cost inside a ResNet training step: kernel variants measured from the optimized HLO.

Run from the repository root: ``python docs/bn_variants.py [arch:batch:image:width] [dtypes] [placements]``
(default ``resnet18:16:32:64 float32,bfloat16 1dev``). Each variant patches jaxbn's kernel at trace time (the
library files are not edited), compiles the whole training step of `benchmarks.model` with `jaxbn.linen.BatchNorm`
and prints BN's in-context cost (step minus the identity step) from `benchmarks.hlo.analyze`: bytes accessed,
kernels, temp bytes, each next to flax's. Deterministic: no timing. Variants:

* ``current``: jaxbn as it runs on this backend;
* ``plain``: the form every backend but XLA:CPU runs (`jaxbn._xla.splits_sibling_reductions` False: no
  optimization barrier keeps sibling reductions' operands apart);
* ``no-remat``: the tangent not wrapped in `jax.checkpoint`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import jax

import jaxbn._xla as xla
from benchmarks import model


@contextlib.contextmanager
def patched(variant: str) -> Iterator[None]:
    saved: list[tuple[object, str, object]] = []

    def setattr_(obj: object, name: str, value: object) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    if variant == "plain":
        setattr_(xla, "splits_sibling_reductions", lambda: False)
    if variant == "no-remat":
        setattr_(jax, "checkpoint", lambda f, **_: f)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


VARIANTS = ("current", "plain", "no-remat")


WANTED = set(sys.argv[4].split(",")) if len(sys.argv) > 4 else set(VARIANTS)


def main() -> None:
    case = model.parse_configs(sys.argv[1] if len(sys.argv) > 1 else "resnet18:16:32:64")[0]
    dtypes = (sys.argv[2] if len(sys.argv) > 2 else "float32,bfloat16").split(",")
    placements = (sys.argv[3] if len(sys.argv) > 3 else "1dev").split(",")
    mib = 2**20
    print(f"{case.label}; BN in-context cost = step - identity step; ratios to flax.linen.BatchNorm (default)")
    print(
        f"{'placement':>9} {'dtype':>8} {'variant':>20} {'BN MiB':>8} {'vs flax':>8} {'BN kernels':>10} {'vs flax':>8}"
        f" {'step temp MiB':>13} {'vs flax':>8} {'all-reduces':>11}"
    )
    for placement in placements:
        for dt in dtypes:
            base = {
                impl: model.compile_step(case, impl, dt, placement)[2] for impl in ("identity", "flax", "flax-exact")
            }
            ident, flax = base["identity"], base["flax"]
            fb, fk = flax.bytes_accessed - ident.bytes_accessed, flax.kernels - ident.kernels
            rows = [("flax", flax), ("flax-exact", base["flax-exact"])]
            for variant in [v for v in VARIANTS if v in WANTED]:
                with patched(variant):
                    jax.clear_caches()
                    rows.append((variant, model.compile_step(case, "jaxbn.linen", dt, placement)[2]))
            for name, c in rows:
                b, k = c.bytes_accessed - ident.bytes_accessed, c.kernels - ident.kernels
                print(
                    f"{placement:>9} {dt:>8} {name:>20} {b / mib:8.1f} {b / fb:7.2f}x {k:10d} {k / fk:7.2f}x"
                    f" {c.temp_bytes / mib:13.2f} {c.temp_bytes / flax.temp_bytes:7.2f}x"
                    f" {c.collectives['all-reduce']:11d}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
