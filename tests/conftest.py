"""Shared fixtures: run a function with and without jax.jit."""

import jax
import pytest


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Returns a wrapper that jit-compiles `fn` (static kwargs closed over) or leaves it eager."""

    def wrap(fn):
        return jax.jit(fn) if request.param else fn

    return wrap
