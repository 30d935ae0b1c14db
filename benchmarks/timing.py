"""The timing harness: interleaved repetitions, medians, the memory-bandwidth probe, the progress bar.

Every timed job is a zero-argument callable returning arrays. `interleave`
runs every job once per round, in a fresh random order each round, so a
change of machine load hits all jobs alike; times are per call, each call
ended with `jax.block_until_ready`.

>>> times = interleave({"a": lambda: 1, "b": lambda: 2}, reps=3)
>>> sorted(times), [len(t) for t in times.values()]
(['a', 'b'], [3, 3])
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

K = TypeVar("K", bound=Hashable)


class Progress(Protocol):
    """What the harness needs of a progress bar (tqdm's interface)."""

    def update(self, n: int = 1) -> object: ...

    def set_postfix_str(self, s: str) -> object: ...

    def close(self) -> object: ...


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, enabled: bool, desc: str = "benchmarks") -> Progress:
    """A tqdm bar on stderr when `enabled` and tqdm is installed, else a silent stand-in."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)  # type: ignore[no-any-return]
    return _NoProgress()


def orders(items: Sequence[K], reps: int, seed: int = 0) -> Iterator[list[K]]:
    """`reps` orderings of `items`: a fresh random permutation each round.

    A random order (rather than a fixed or rotated one) keeps any job from
    always following the same other job, whose leftovers (freed memory,
    cache, clock) would otherwise bias it the same way every round.
    """
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        yield [items[i] for i in rng.permutation(len(items))]


def interleave(
    jobs: Mapping[K, Callable[[], object]], reps: int, bar: Progress | None = None, seed: int = 0
) -> dict[K, list[float]]:
    """Seconds per call of every job, `reps` interleaved rounds (jobs must be compiled and warm)."""
    times: dict[K, list[float]] = {k: [] for k in jobs}
    for order in orders(list(jobs), reps, seed):
        for k in order:
            t0 = time.perf_counter()
            jax.block_until_ready(jobs[k]())
            times[k].append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
    return times


def median_ms(times: Sequence[float]) -> float:
    """Median of seconds, in milliseconds."""
    return statistics.median(times) * 1e3


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """(25th, 75th) percentiles of `values` (the spread reported next to a median)."""
    q = np.percentile(np.asarray(values, np.float64), [25, 75])
    return float(q[0]), float(q[1])


def geomean(values: Sequence[float | None]) -> float | None:
    """Geometric mean of the positive values, None if there are none.

    >>> geomean([2.0, 8.0, None])
    4.0
    """
    vals = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


#: Bytes of the array the bandwidth probe copies (large enough to leave every cache).
COPY_BYTES = 64 * 2**20


def copy_job(nbytes: int = COPY_BYTES) -> tuple[Callable[[], object], int]:
    """A compiled job that reads and writes `nbytes` (a negation, which XLA cannot elide), and its traffic in bytes.

    Time it with the other jobs: traffic / seconds is the memory bandwidth
    this machine reaches in the same run, under the same load.
    """
    x = jnp.ones((nbytes // 4,), jnp.float32)
    compiled = jax.jit(jnp.negative).lower(x).compile()
    jax.block_until_ready(compiled(x))
    return (lambda: compiled(x)), 2 * x.nbytes
