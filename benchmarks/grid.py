"""The benchmark grids: layer shapes, model configurations and dtypes.

>>> [c.key for c in GRID]
['dense', 'nhwc56', 'nhwc28', 'nhwc14', 'nhwc7', 'nchw28']
>>> parse_cases("32x8x8x64@-1", quick=False)[0].label
'NHWC 32x8x8x64'
"""

from __future__ import annotations

import dataclasses
import re

#: dtype names of both grids.
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer-grid shape: `x.shape` and its feature axis."""

    key: str
    shape: tuple[int, ...]
    axis: int

    @property
    def layout(self) -> str:
        """'dense', 'NHWC' or 'NCHW'."""
        if len(self.shape) == 2:
            return "dense"
        return "NCHW" if self.axis % len(self.shape) == 1 else "NHWC"

    @property
    def label(self) -> str:
        """e.g. 'NHWC 64x56x56x64'."""
        return f"{self.layout} {'x'.join(map(str, self.shape))}"


#: The default layer grid.
GRID = (
    Case("dense", (4096, 1024), -1),
    Case("nhwc56", (64, 56, 56, 64), -1),
    Case("nhwc28", (128, 28, 28, 128), -1),
    Case("nhwc14", (128, 14, 14, 256), -1),
    Case("nhwc7", (128, 7, 7, 512), -1),
    Case("nchw28", (128, 128, 28, 28), 1),
)
#: Tiny layer shapes for `--quick` (a smoke test, not a measurement).
QUICK_GRID = (
    Case("dense", (64, 32), -1),
    Case("nhwc", (8, 4, 4, 16), -1),
    Case("nchw", (8, 16, 4, 4), 1),
)


def parse_cases(spec: str | None, quick: bool) -> list[Case]:
    """Layer cases from a comma-separated list of grid keys or `AxBxC[@axis]` shapes (None: the whole grid).

    Raises:
      ValueError: an item is neither a grid key nor a shape.
    """
    grid = QUICK_GRID if quick else GRID
    if not spec:
        return list(grid)
    known = {c.key: c for c in ((*GRID, *QUICK_GRID) if quick else (*QUICK_GRID, *GRID))}
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in known:
            out.append(known[item])
            continue
        m = re.fullmatch(r"(\d+(?:x\d+)+)(?:@(-?\d+))?", item)
        if not m:
            raise ValueError(f"bad shape {item!r}: use one of {', '.join(known)} or e.g. 32x8x8x64@-1")
        shape = tuple(int(s) for s in m.group(1).split("x"))
        out.append(Case(item, shape, int(m.group(2) or -1)))
    return out


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One whole-model configuration: architecture, global batch, image size, channel width."""

    arch: str
    batch: int
    image: int
    width: int

    @property
    def label(self) -> str:
        """e.g. 'resnet18 b16 32px w64'."""
        return f"{self.arch} b{self.batch} {self.image}px w{self.width}"


#: How the whole-model step is placed: one device, or 8 with sync BN two ways.
PLACEMENTS = {
    "1dev": "one device",
    "shard_map": "8 devices, jax.shard_map with the BN axis_name (sync BN), gradients pmean-ed",
    "jit": "8 devices, plain jax.jit over a batch sharded on a mesh (XLA partitions the BN reductions)",
    "pmap": "8 devices, jax.pmap(step, axis_name=...) as flax's ImageNet train.py runs it (sync BN)",
}
#: The default whole-model grid: small enough for a few minutes on 2 CPU cores.
MODEL_GRID = (ModelCase("resnet18", 16, 32, 32), ModelCase("resnet50", 8, 32, 16))
#: Tiny models for `--quick`.
QUICK_MODEL_GRID = (ModelCase("resnet10", 8, 16, 8),)
