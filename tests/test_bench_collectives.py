"""benchmarks.collectives: the collective budget of one sync-BN training step (counting: test_bench_hlo.py)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import collectives as col
from benchmarks import hlo

needs8 = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (the root conftest.py sets 8 fake CPU devices)"
)


@pytest.fixture(scope="module")
def table8():
    if jax.device_count() != 8:
        pytest.skip("needs exactly 8 devices (the root conftest.py sets 8 fake CPU devices)")
    return {row["impl"]: row for row in col.sync_bn_table()}


def test_jaxbn_step_has_at_most_two_collectives(table8):
    """gather: ONE all-gather forward (stable, exact moments) + ONE all-reduce backward."""
    gather = table8["jaxbn gather"]["counts"]
    assert gather["all-gather"] == 1 and gather["all-reduce"] == 1 and sum(gather.values()) == 2
    assert table8["jaxbn auto"]["counts"] == gather  # auto gathers up to 16 devices
    psum = table8["jaxbn psum"]["counts"]
    # Two all-reduces forward, one backward; XLA may combine the second forward one with the
    # backward one (the backward sums need only the mean), leaving two.
    assert psum["all-reduce"] in (2, 3) and sum(psum.values()) == psum["all-reduce"]


def test_flax_collective_counts(table8):
    """What jaxbn is compared against: flax.linen.BatchNorm synchronizes with pmean."""
    assert sum(table8["flax fast_var=True"]["counts"].values()) == 2
    assert sum(table8["flax fast_var=False"]["counts"].values()) == 4


def test_64_devices_in_a_subprocess(table8):
    rows = {r["impl"]: r for r in col.table_in_subprocess(64, ["jaxbn auto", "jaxbn gather", "jaxbn psum"])}
    assert all(r["devices"] == 64 for r in rows.values())
    # psum's payload does not depend on the device count.
    assert rows["jaxbn psum"]["bytes"] == table8["jaxbn psum"]["bytes"]
    assert rows["jaxbn psum"]["counts"] == table8["jaxbn psum"]["counts"]
    # gather stays at two collectives; its gathered result grows with the devices.
    assert sum(rows["jaxbn gather"]["counts"].values()) == 2
    assert rows["jaxbn gather"]["bytes"]["all-gather"] == 8 * table8["jaxbn gather"]["bytes"]["all-gather"]
    assert rows["jaxbn gather"]["bytes"]["all-reduce"] == table8["jaxbn gather"]["bytes"]["all-reduce"]
    # above GATHER_MAX_DEVICES, auto switches to psum.
    assert rows["jaxbn auto"]["counts"] == rows["jaxbn psum"]["counts"]


def test_main_prints_rows(table8, capsys):
    col.main(["--json", "--impls", "jaxbn gather"])
    (row,) = json.loads(capsys.readouterr().out)
    assert row["counts"] == table8["jaxbn gather"]["counts"]
    text = col.format_table(list(table8.values()))
    assert "jaxbn gather" in text and "1 all-gather" in text


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

    counts = hlo.count_collectives(step, x, dy, scale, bias)
    assert counts["collective-permute"] == 0 and counts["all-gather"] == 0
    assert counts["all-reduce"] <= 3
