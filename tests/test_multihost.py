"""Sync-BN across processes: 2 processes on localhost, 2 CPU devices each.

The workers (tests/multihost_worker.py) join with `jax.distributed.initialize`
over gloo CPU collectives and check pmap and shard_map synchronized batch
norm over the 4 global devices against the float64 single-device result on
the whole batch. This test starts them, waits at most TIMEOUT_S, kills them
(by their own handles) on any failure, and reads their printed results.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

TIMEOUT_S = 120
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_two_processes_match_single_device():
    import jax

    if not hasattr(jax, "distributed"):
        pytest.skip("this JAX has no jax.distributed")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(i), str(port)],
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs: list[str] = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # our own children only, by handle
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate()[0] for p in procs]
    report = "\n".join(f"----- process {i} (exit {p.returncode}) -----\n{out[-3000:]}" for i, (p, out) in
                       enumerate(zip(procs, outputs, strict=True)))
    assert all(p.returncode == 0 for p in procs), f"a worker failed or timed out after {TIMEOUT_S} s\n{report}"
    for i, out in enumerate(outputs):
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert lines, report
        result = json.loads(lines[-1][len("RESULT ") :])
        assert result["process"] == i and result["devices"] == 4
        assert set(result["errors"]) == {"pmap gather", "pmap psum", "shard_map auto", "shard_map psum"}
        assert result["worst"] < 5e-5, report
