"""jaxbn: batch normalization for JAX and Flax, done right.

Pure functions over an explicit `RunningStats` pytree, exact and stable
cross-device statistics, and drop-in BatchNorm modules for Flax
(`jaxbn.linen`, `jaxbn.nnx`), equinox (`jaxbn.equinox`) and haiku
(`jaxbn.haiku`), and PyTorch state dicts and deployment utilities
(`jaxbn.interop`).
The submodules load lazily: `import jaxbn` imports no framework.
"""

from jaxbn._accumulate import combine_moments as combine_moments
from jaxbn._accumulate import commit_moments as commit_moments
from jaxbn._accumulate import empty_moments as empty_moments
from jaxbn._fold import fold as fold
from jaxbn._norm import batch_norm as batch_norm
from jaxbn._norm import batch_renorm as batch_renorm
from jaxbn._norm import normalize as normalize
from jaxbn._running import Moments as Moments
from jaxbn._running import RunningStats as RunningStats
from jaxbn._running import init_stats as init_stats
from jaxbn._running import update_stats as update_stats
from jaxbn._stats import moments as moments

__version__ = "0.2.0"

_SUBMODULES = ("linen", "nnx", "equinox", "haiku", "interop")


def __getattr__(name: str) -> object:  # lazy: `import jaxbn` loads no framework, `jaxbn.linen` still works
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"jaxbn.{name}")
    raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


__all__ = [
    "Moments",
    "RunningStats",
    "batch_norm",
    "batch_renorm",
    "combine_moments",
    "commit_moments",
    "empty_moments",
    "fold",
    "init_stats",
    "moments",
    "normalize",
    "update_stats",
]
