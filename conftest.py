"""Test-session setup shared by tests/ and the doctests in jaxbn/.

Eight fake CPU devices for the multi-device tests and a quicker XLA:CPU backend
(both must be set before jax is imported), and equinox's and haiku's test settings: rank promotion and implicit dtype
promotion as errors, to catch accidental broadcasts and silent upcasts.
"""

import os

# XLA's backend optimization level 0: LLVM's optimization of the CPU machine code is most of what a
# test spends compiling programs it runs once (about 30% of the compile-heavy tests' time). The
# optimized HLO, whose ops and collectives the tests count, is the same at every level.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
