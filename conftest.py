"""Test-session setup shared by tests/ and the doctests in jaxbn/.

Eight fake CPU devices for the multi-device tests (must be set before jax is
imported), and equinox's and haiku's test settings: rank promotion and implicit dtype
promotion as errors, to catch accidental broadcasts and silent upcasts.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
