"""benchmarks.collectives: the collective budget of one sync-BN training step (counting: test_bench_hlo.py)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import collectives as col
from benchmarks import hlo

needs8 = pytest.mark.usefixtures("eight_devices")  # fewer devices: a failure saying why, never a skip


@pytest.fixture(scope="module")
def table8():
    if jax.device_count() != 8:
        pytest.skip("needs exactly 8 devices (the root conftest.py sets 8 fake CPU devices)")
    return {row["impl"]: row for row in col.sync_bn_table()}


def _only(**counts):
    return {**dict.fromkeys(hlo.KINDS, 0), **counts}


def test_jaxbn_step_has_two_collectives(table8):
    """auto = psum: ONE all-reduce forward (float64 sums of the local moments) + ONE backward, in the
    whole program; gather: one all-gather forward."""
    for impl in ("jaxbn auto", "jaxbn psum"):
        assert table8[impl]["counts"] == _only(**{"all-reduce": 2})
    gather = table8["jaxbn gather"]
    assert gather["counts"] == _only(**{"all-reduce": 1, "all-gather": 1})


def test_flax_collective_counts(table8):
    """What jaxbn is compared against: flax.linen.BatchNorm synchronizes with pmean."""
    assert sum(table8["flax fast_var=True"]["counts"].values()) == 2
    assert sum(table8["flax fast_var=False"]["counts"].values()) == 4


def test_64_devices_in_a_subprocess(table8):
    rows = {r["impl"]: r for r in col.table_in_subprocess(64, ["jaxbn auto", "jaxbn gather", "jaxbn psum"])}
    assert all(r["devices"] == 64 for r in rows.values())
    # auto/psum: the same collectives and payload whatever the device count.
    for impl in ("jaxbn auto", "jaxbn psum"):
        assert rows[impl]["counts"] == table8[impl]["counts"] == _only(**{"all-reduce": 2})
        assert rows[impl]["bytes"] == table8[impl]["bytes"]
    # gather stays at two collectives; its gathered result grows with the devices.
    assert rows["jaxbn gather"]["counts"] == table8["jaxbn gather"]["counts"]
    assert rows["jaxbn gather"]["bytes"]["all-gather"] == 8 * table8["jaxbn gather"]["bytes"]["all-gather"]
    assert rows["jaxbn gather"]["bytes"]["all-reduce"] == table8["jaxbn gather"]["bytes"]["all-reduce"]


def test_main_prints_rows(table8, capsys):
    col.main(["--json", "--impls", "jaxbn gather"])
    (row,) = json.loads(capsys.readouterr().out)
    assert row["counts"] == table8["jaxbn gather"]["counts"]
    text = col.format_table(list(table8.values()))
    assert "jaxbn gather" in text and "1 all-gather" in text and "1 all-reduce" in text


@needs8
def test_plain_jit_on_a_sharded_batch_takes_few_collectives():
    """No axis_name, batch sharded under jax.jit: XLA's own all-reduces, no broadcast of one shard's rows."""
    import jaxbn

    mesh = jax.make_mesh((8,), ("data",))
    x, dy, scale, bias, _, _ = col.sync_bn_args(mesh)

    def step(x, dy, scale, bias):
        def loss(x, scale, bias):
            y, new = jaxbn.batch_norm(x, jaxbn.init_stats(x.shape[-1]), scale, bias, training=True)
            return jnp.sum(y * dy), new

        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)

    # XLA's partitioner: the sums of the per-shard moments, the backward sums (docs/sync.md).
    assert hlo.count_collectives(step, x, dy, scale, bias) == _only(**{"all-reduce": 2})
