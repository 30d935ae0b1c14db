"""Ghost (virtual) batch norm: the first batch axis split into groups.

In training, ``x`` of shape ``(N, ...)`` becomes ``(G, N/G, ...)`` with the
group axis an extra feature axis, so each group is normalized with its own
moments by one call of the functional core. The running statistics take the
mean of the moments of the groups that contribute (have a valid entry and
finite moments), per feature: a group that a mask hides entirely contributes
nothing, so padding that fills whole groups gives the same update as the
batch without it. That is the mean of the contributing groups' updated
statistics, because `update_stats` is affine in the moments; which groups
contributed is read from a per-group, per-feature `count` that the core
advances exactly where it updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxbn._layout import Layout
from jaxbn._running import RunningStats, stats_dtype


@dataclass(frozen=True)
class GhostBatches:
    """`groups` ghost batches of an input with layout `layout` (batch axis 0, not a feature axis).

    >>> g = GhostBatches.of(Layout.of((8, 3), -1), size=2, initializing=False)
    >>> g.groups, g.axes, g.split(jnp.zeros((8, 3))).shape
    (4, (0, 2), (4, 2, 3))
    """

    layout: Layout
    groups: int

    @classmethod
    def of(cls, layout: Layout, size: int | None, initializing: bool) -> GhostBatches | None:
        """The ghost batches of `size` entries, or None for whole-batch moments.

        Raises:
          ValueError: axis 0 is a feature axis, or `size` does not divide the
            batch (except in flax's `init`, which then uses the whole batch).
        """
        if size is None:
            return None
        shape = layout.shape
        if 0 in layout.feature_axes:
            raise ValueError(
                f"virtual_batch_size splits the first batch axis of x, but axis 0 is a feature axis "
                f"(x has shape {shape}); put the batch first or set virtual_batch_size=None"
            )
        n = shape[0]
        if n % size:
            if initializing:
                return None
            raise ValueError(
                f"virtual_batch_size={size} must divide the batch size, but x of shape {shape} has "
                f"{n} entries on its leading batch axis; use a batch size that is a multiple of {size} "
                "(inference has no such requirement)"
            )
        groups = n // size
        return None if groups == 1 else cls(layout, groups)

    @property
    def axes(self) -> tuple[int, ...]:
        """Feature axes of the grouped input: the group axis, then x's feature axes shifted by one."""
        return (0,) + tuple(a + 1 for a in self.layout.feature_axes)

    def split(self, x: jax.Array) -> jax.Array:
        """(N, ...) -> (G, N/G, ...)."""
        return x.reshape((self.groups, x.shape[0] // self.groups) + x.shape[1:])

    def split_mask(self, mask: jax.Array | None) -> jax.Array | None:
        """A mask of x's rank (leading axis N or 1) -> the grouped input's rank."""
        if mask is None:
            return None
        if mask.shape[0] == self.layout.shape[0]:
            return self.split(mask)
        return mask.reshape((1, 1) + mask.shape[1:])

    def tile(self, v: jax.Array | None) -> jax.Array | None:
        """Feature-shaped -> (G, *feature_shape), the same value for every group."""
        return None if v is None else self._tiled(v)

    def tile_stats(self, stats: RunningStats) -> RunningStats:
        """The running statistics, one copy per group, with `count` per group and feature (see `merge`)."""
        return RunningStats(self._tiled(stats.mean), self._tiled(stats.var), self._tiled(jnp.asarray(stats.count)))

    def _tiled(self, v: jax.Array) -> jax.Array:
        return jnp.broadcast_to(v, (self.groups,) + self.layout.feature_shape)

    def merge(self, y: jax.Array, new: RunningStats, old: RunningStats) -> tuple[jax.Array, RunningStats]:
        """The grouped output and per-group updated statistics -> x's shape and the merged statistics.

        `new` comes from `tile_stats(old)` through `update_stats`: where
        `new.count` went up, that group updated that feature. Per feature,
        the result is the mean of the updated groups' statistics (the update
        with the mean of their moments), or `old` where no group updated;
        `count` goes up by one if any feature of any group updated.
        """
        took = new.count > self._tiled(jnp.asarray(old.count))
        k = jnp.sum(took, axis=0)

        def pooled(v: jax.Array, before: jax.Array) -> jax.Array:
            acc = stats_dtype(v.dtype)
            total = jnp.sum(jnp.where(took, v.astype(acc), jnp.zeros_like(v, acc)), axis=0)
            mean = total / jnp.maximum(k, 1).astype(acc)
            return jnp.where(k > 0, mean, before.astype(acc) + jnp.zeros_like(mean)).astype(v.dtype)

        count = jnp.asarray(old.count)
        merged = RunningStats(pooled(new.mean, old.mean), pooled(new.var, old.var),
                              count + jnp.any(took).astype(count.dtype))
        return y.reshape(self.layout.shape), merged
