"""Where the features are: the one description of an input's feature layout.

Every entry point (functions and modules) turns `(x.shape, axis)` into a
`Layout` once; nothing else computes feature axes, reduced axes or the
shapes derived from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn._checks import Axes, canonical_axes, check_feature_array


@dataclass(frozen=True)
class Layout:
    """Static facts about an input of shape `shape` with feature axes `axis`.

    Attributes:
      shape: the input's shape.
      axis: the feature axis or axes as the user gave them (for messages).
      feature_axes: sorted non-negative feature axes.
      reduced_axes: every other axis, sorted.

    >>> lay = Layout.of((8, 5, 5, 3), -1)
    >>> lay.feature_shape, lay.reduced_axes, lay.keep_shape, lay.reduced_size
    ((3,), (0, 1, 2), (1, 1, 1, 3), 200)
    """

    shape: tuple[int, ...]
    axis: Axes
    feature_axes: tuple[int, ...]
    reduced_axes: tuple[int, ...]

    @classmethod
    def of(cls, shape: Sequence[int], axis: Axes) -> Layout:
        """The layout of an input of `shape` with feature axis/axes `axis` (validated)."""
        shape = tuple(shape)
        feat = canonical_axes(len(shape), axis)
        red = tuple(a for a in range(len(shape)) if a not in feat)
        return cls(shape, axis, feat, red)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Sizes on the feature axes, in ascending axis order: (F1, ..., Fk)."""
        return tuple(self.shape[a] for a in self.feature_axes)

    @property
    def keep_shape(self) -> tuple[int, ...]:
        """The input's shape with every reduced axis set to 1 (broadcasts against x)."""
        return tuple(d if a in self.feature_axes else 1 for a, d in enumerate(self.shape))

    @property
    def reduced_size(self) -> int:
        """Number of values per feature on this device: the product of the reduced sizes."""
        return math.prod(self.shape[a] for a in self.reduced_axes)

    def keep(self, v: jax.Array | None) -> jax.Array | None:
        """Feature-shaped (F1, ..., Fk) -> `keep_shape`, broadcastable against x."""
        return None if v is None else jnp.reshape(v, self.keep_shape)

    def flat(self, v: jax.Array) -> jax.Array:
        """Broadcastable against x (reduced axes of size 1) -> feature-shaped."""
        return jnp.broadcast_to(v, self.keep_shape).reshape(self.feature_shape)

    def check(self, value: ArrayLike | None, name: str, hint: str = "") -> jax.Array | None:
        """`value` as a feature-shaped array, or a ValueError naming `name` and the shapes."""
        return check_feature_array(value, name, self.feature_shape, self.shape, self.axis, hint)
