"""Shared fixtures: run a function with and without jax.jit; the device count of the multi-device tests."""

import jax
import pytest

#: The multi-device tests run on this many devices: the root conftest.py sets 8 fake CPU devices.
DEVICES = 8


def require_devices(n: int = DEVICES) -> None:
    """Fails the test, loudly, when fewer than `n` devices are visible: never a silent skip.

    A run with ``JAX_PLATFORMS=gpu`` on one GPU would otherwise drop every sync test and still pass.
    """
    found = jax.device_count()
    if found < n:
        pytest.fail(
            f"this test needs {n} devices and found {found} on the {jax.default_backend()!r} backend: run "
            f"the suite with JAX_PLATFORMS=cpu (the root conftest.py then provides {DEVICES} fake CPU devices) "
            f"or on {n} accelerators",
            pytrace=False,
        )


@pytest.fixture
def eight_devices():
    """Part of the setup of every multi-device test: 8 devices, or a failure that says how to get them."""
    require_devices(DEVICES)
    return jax.devices()[:DEVICES]


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Returns a wrapper that jit-compiles `fn` (static kwargs closed over) or leaves it eager."""

    def wrap(fn):
        return jax.jit(fn) if request.param else fn

    return wrap
