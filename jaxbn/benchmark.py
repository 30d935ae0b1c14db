"""Alias kept for ``python -m jaxbn.benchmark``: the benchmarks live in `jaxbn.bench`.

``python -m jaxbn.benchmark [options]`` is ``python -m jaxbn.bench [layer|model|collectives] [options]``.
"""

from jaxbn.bench.__main__ import main as main

if __name__ == "__main__":
    main()
