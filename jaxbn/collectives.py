"""Alias kept for ``jaxbn.collectives``: collective counting lives in `jaxbn.bench.hlo`.

``python -m jaxbn.collectives`` is ``python -m jaxbn.bench collectives``.
"""

from jaxbn.bench.collectives import cpu_devices_env as cpu_devices_env
from jaxbn.bench.collectives import main as main
from jaxbn.bench.hlo import KINDS as KINDS
from jaxbn.bench.hlo import CollectiveOp as CollectiveOp
from jaxbn.bench.hlo import collective_bytes as collective_bytes
from jaxbn.bench.hlo import count_collectives as count_collectives
from jaxbn.bench.hlo import parse_collectives as parse_collectives

if __name__ == "__main__":
    main()
