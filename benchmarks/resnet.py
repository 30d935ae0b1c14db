"""ResNet-style CNNs for the whole-model benchmark, with the batch norm swapped by one argument.

NHWC, a batch norm after every convolution, ReLU, residual adds: ResNet-18
(basic blocks, stages 2-2-2-2; ResNet-10, one block per stage, for quick runs) and ResNet-50 (bottleneck blocks, stages
3-4-6-3, 4x expansion), after flax's ImageNet example (7x7/2 stem and 3x3/2
max pool), with a `width` knob to scale the channels. The batch norm is made
by `norm_factory(impl, ...)`:

* ``"flax"``: `flax.linen.BatchNorm()` (default `use_fast_variance=True`);
* ``"flax-exact"``: `flax.linen.BatchNorm(use_fast_variance=False)`;
* ``"jaxbn.linen"``: `jaxbn.linen.BatchNorm()`;
* ``"identity"``: no batch norm at all (the baseline that isolates BN's cost).

>>> import jax, jax.numpy as jnp
>>> model = resnet("resnet18", "identity", width=8, num_classes=3)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
>>> model.apply(variables, jnp.zeros((2, 32, 32, 3)), mutable=["batch_stats"])[0].shape
(2, 3)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

#: Batch-norm implementations a model can be built with, and what each is.
NORMS = {
    "flax": "flax.linen.BatchNorm() (default: use_fast_variance=True)",
    "flax-exact": "flax.linen.BatchNorm(use_fast_variance=False)",
    "jaxbn.linen": "jaxbn.linen.BatchNorm() (drop-in for flax's)",
    "identity": "no batch norm (baseline: the step minus this step is BN's in-context cost)",
}
#: name -> (block kind, blocks per stage)
ARCHITECTURES = {
    "resnet10": ("basic", (1, 1, 1, 1)),  # the smallest of the family: quick runs and tests
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}

NormFactory = Callable[..., nn.Module]


class Identity(nn.Module):
    """Stands in for a batch norm: returns its input (in the model's dtype)."""

    dtype: DTypeLike | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x if self.dtype is None else x.astype(self.dtype)


def norm_factory(impl: str, *, dtype: DTypeLike | None = None, axis_name: Hashable | None = None) -> NormFactory:
    """A constructor of training-mode batch-norm layers of implementation `impl` (a key of `NORMS`).

    The layers normalize with batch statistics (`use_running_average=False`),
    compute in `dtype` and synchronize over `axis_name`.
    """
    if impl == "identity":
        return functools.partial(Identity, dtype=dtype)
    if impl in ("flax", "flax-exact"):
        cls: Callable[..., nn.Module] = nn.BatchNorm
    elif impl == "jaxbn.linen":
        from jaxbn import linen

        cls = linen.BatchNorm
    else:
        raise ValueError(f"unknown batch-norm implementation {impl!r}; choose from {', '.join(NORMS)}")
    return functools.partial(
        cls,
        use_running_average=False,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        axis_name=axis_name,
        use_fast_variance=impl != "flax-exact",
    )


class _Block(nn.Module):
    """A residual block's configuration: width, batch-norm factory, stride, compute dtype."""

    features: int
    norm: NormFactory
    strides: int = 1
    dtype: DTypeLike = jnp.float32


class BasicBlock(_Block):
    """Two 3x3 convolutions, each followed by a batch norm, and a residual add."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        y = nn.relu(self.norm()(conv(self.features, (3, 3), (self.strides, self.strides))(x)))
        y = self.norm()(conv(self.features, (3, 3))(y))
        if x.shape != y.shape:
            x = self.norm()(conv(self.features, (1, 1), (self.strides, self.strides))(x))
        return nn.relu(x + y)


class BottleneckBlock(_Block):
    """1x1, 3x3 and 1x1 (4x wider) convolutions, each followed by a batch norm, and a residual add."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        y = nn.relu(self.norm()(conv(self.features, (1, 1))(x)))
        y = nn.relu(self.norm()(conv(self.features, (3, 3), (self.strides, self.strides))(y)))
        y = self.norm()(conv(4 * self.features, (1, 1))(y))
        if x.shape != y.shape:
            x = self.norm()(conv(4 * self.features, (1, 1), (self.strides, self.strides))(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A ResNet: 7x7/2 stem, 3x3/2 max pool, residual stages, global average pool, dense classifier."""

    stage_sizes: Sequence[int]
    bottleneck: bool
    norm: NormFactory
    width: int = 64
    num_classes: int = 10
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(self.norm()(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        block = BottleneckBlock if self.bottleneck else BasicBlock
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = 2 if i > 0 and j == 0 else 1
                x = block(self.width * 2**i, self.norm, strides, self.dtype)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def resnet(
    arch: str,
    impl: str,
    *,
    width: int = 64,
    num_classes: int = 10,
    dtype: DTypeLike = jnp.float32,
    axis_name: Hashable | None = None,
) -> ResNet:
    """ResNet `arch` (a key of `ARCHITECTURES`) with batch-norm implementation `impl` (a key of `NORMS`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    kind, stages = ARCHITECTURES[arch]
    norm = norm_factory(impl, dtype=dtype, axis_name=axis_name)
    return ResNet(stages, kind == "bottleneck", norm, width, num_classes, dtype)
