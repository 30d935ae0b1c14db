"""The whole-model benchmark (`python -m benchmarks model`): structure only, never timings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import grid, model, plot, report, resnet
from benchmarks.__main__ import main

TINY = "resnet10:8:16:4"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-device float32 run of a tiny ResNet-10, 2 reps, through the CLI (in this process)."""
    path = tmp_path_factory.mktemp("model") / "model.png"
    rep = main(["model", "--configs", TINY, "--placements", "1dev", "--dtypes", "float32", "--reps", "2",
                "--impls", "flax,jaxbn.linen", "--no-progress", "--json", "--plot", str(path)])  # fmt: skip
    assert path.read_bytes()[:4] == b"\x89PNG"
    return json.loads(json.dumps(rep))  # what --json printed


def test_report_fields(saved):
    assert {"meta", "config", "implementations", "results", "summary"} <= set(saved)
    assert saved["implementations"] == ["flax", "jaxbn.linen", "identity"]  # identity added: BN's cost needs it
    keys = {"model", "placement", "dtype", "impl", "median_ms", "times_ms", "speedup_vs_flax", "speedup_iqr",
            "compile_s", "temp_bytes", "bytes_accessed", "kernels", "collectives", "conditionals", "bn"}  # fmt: skip
    for r in saved["results"]:
        assert keys <= set(r)
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and r["compile_s"] > 0
        assert r["kernels"] > 0 and r["bytes_accessed"] > 0
        assert sum(r["collectives"].values()) == 0 and r["conditionals"] == 0  # one device, no branch
    assert set(saved["summary"]["targets"]) == {
        "in-context BN bytes accessed <= 0.7x flax's",
        "kernels <= flax's",
        "compiled temp bytes <= 0.85x flax's",
        "median step speedup vs flax >= 0.97",
    }


def test_identity_has_no_bn_cost_and_bn_costs_are_differences(saved):
    rows = {r["impl"]: r for r in saved["results"]}
    ident, flax = rows["identity"], rows["flax"]
    assert ident["bn"] is None
    for impl in ("flax", "jaxbn.linen"):
        bn, r = rows[impl]["bn"], rows[impl]
        assert bn["kernels"] == r["kernels"] - ident["kernels"] > 0  # batch norms launch kernels of their own
        assert bn["bytes_accessed"] == r["bytes_accessed"] - ident["bytes_accessed"] > 0
        assert bn["temp_bytes"] == r["temp_bytes"] - ident["temp_bytes"]
        assert bn["ms"] == pytest.approx(float(np.median(np.subtract(r["times_ms"], ident["times_ms"]))))
    assert flax["bn"]["bytes_vs_flax"] == 1.0 and flax["speedup_vs_flax"] == 1.0
    assert rows["jaxbn.linen"]["bn"]["kernels_vs_flax"] == rows["jaxbn.linen"]["bn"]["kernels"] / flax["bn"]["kernels"]


def test_tables(saved):
    text = report.format_model(saved)
    md = report.format_model(saved, markdown=True)
    for impl in saved["implementations"]:
        assert impl in text and f"| {impl} |" in md
    assert "targets" in text and "**Targets**" in md


def test_the_models_have_a_bn_after_every_conv():
    x = jnp.zeros((1, 16, 16, 3))
    for arch, convs in (("resnet18", 1 + 2 * 8 + 3), ("resnet50", 1 + 3 * 16 + 4)):
        variables = jax.eval_shape(resnet.resnet(arch, "flax", width=4).init, jax.random.key(0), x)
        n_conv = sum(
            "Conv" in "/".join(map(str, p)) for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
        )
        n_bn = len(variables["batch_stats"])
        assert n_conv == convs and n_bn == sum("Block" in k or k.startswith("BatchNorm") for k in variables["params"])
        leaves = jax.tree_util.tree_leaves(variables["batch_stats"])
        assert len(leaves) == 2 * convs  # a mean and a var per conv
        assert "batch_stats" not in jax.eval_shape(resnet.resnet(arch, "identity", width=4).init, jax.random.key(0), x)


@pytest.mark.usefixtures("eight_devices")  # fewer devices: a failure saying why, never a skip
@pytest.mark.parametrize("placement", ["shard_map", "jit", "pmap"])
def test_sharded_steps_communicate_and_identity_only_for_gradients(placement):
    case = grid.ModelCase("resnet10", 8, 16, 4)
    *_, ident = model.compile_step(case, "identity", "float32", placement)
    *_, flax = model.compile_step(case, "flax", "float32", placement)
    assert sum(ident.collectives.values()) >= 1  # the gradient mean
    assert flax.collectives["all-reduce"] > ident.collectives["all-reduce"]  # plus the BN statistics
    if placement != "jit":  # sync BN: jaxbn runs no more collectives per step than flax's, no all-gather
        *_, ours = model.compile_step(case, "jaxbn.linen", "float32", placement)
        assert ours.collectives == flax.collectives
        assert ours.conditionals == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown placement 'tpu'"):
        model.compile_step(grid.ModelCase("resnet18", 8, 16, 4), "flax", "float32", "tpu")
    with pytest.raises(ValueError, match="unknown implementation"):
        model.run(grid.QUICK_MODEL_GRID, ["1dev"], ["float32"], ["torch"])
    with pytest.raises(ValueError, match="bad model config 'resnet18:8'"):
        model.parse_configs("resnet18:8")
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        resnet.resnet("vgg", "flax")
    with pytest.raises(ValueError, match="unknown batch-norm implementation 'torch'"):
        resnet.norm_factory("torch")


def test_plot_needs_nothing_but_the_report(saved, tmp_path):
    pytest.importorskip("matplotlib")
    plot.plot_model(saved, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 0


def test_compile_only_costs():
    """`model.costs` (the figures' deterministic whole-step table): in-context differences and ratios, no timing."""
    case = model.parse_configs(TINY)[0]
    rows = model.costs([case], ["1dev"], ["float32"], ["flax", "jaxbn.linen"])
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"flax", "jaxbn.linen", "identity"} and by["identity"]["bn"] is None
    for impl in ("flax", "jaxbn.linen"):
        r, bn = by[impl], by[impl]["bn"]
        assert bn["kernels"] == r["kernels"] - by["identity"]["kernels"] > 0
        assert "median_ms" not in r
    assert by["flax"]["bn"]["bytes_accessed_vs_flax"] == 1.0
    ours = by["jaxbn.linen"]["bn"]
    assert ours["kernels_vs_flax"] == ours["kernels"] / by["flax"]["bn"]["kernels"]
