"""A ResNet-18 written the way flax's ImageNet example writes it: a model that knows nothing of jaxbn.

ResNet v1 with basic blocks (stages 2-2-2-2), a 7x7/2 stem, a 3x3/2 max pool,
a `flax.linen.BatchNorm` after every convolution built from one
``functools.partial(nn.BatchNorm, use_running_average=not train,
momentum=0.9, epsilon=1e-5)`` with no `axis_name`, and the variable names of
flax's example (`conv_init`, `bn_init`, `ResNetBlock_<i>`, `conv_proj`,
`norm_proj`). tests/test_convert.py converts it to jaxbn's layers without
editing it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class ResNetBlock(nn.Module):
    """Two 3x3 convolutions, each followed by a batch norm; a projected shortcut when the shape changes."""

    filters: int
    conv: Any
    norm: Any
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
        y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(y))
        if shortcut.shape != y.shape:
            shortcut = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(shortcut)
            shortcut = self.norm(name="norm_proj")(shortcut)
        return nn.relu(shortcut + y)


class ResNet(nn.Module):
    """ResNet v1 on NHWC images."""

    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 64
    act: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = self.act(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, conv=conv, norm=norm, strides=strides)(x)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
