"""Every example runs (in its fast mode) and shows what it exists to show.

Each example prints its results; the checks below read them and assert the
point of the example (a model that trains reaches its accuracy, a fix beats
the fault it fixes, a conversion matches to float32 rounding), with margins
for the fast mode and for other JAX versions. Each example still runs once.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))


def number(pattern: str, out: str, group: int = 1) -> float:
    """The number a regex captures in the example's output (the first match)."""
    m = re.search(pattern, out, re.M)
    assert m, f"the example's output has no line matching {pattern!r}:\n{out[-2000:]}"
    return float(m.group(group))


def vector(pattern: str, out: str) -> np.ndarray:
    """A printed numpy vector ``[1.0 2.0 ...]`` after a label."""
    m = re.search(pattern + r"\s*\[([^\]]*)\]", out, re.M)
    assert m, f"the example's output has no vector after {pattern!r}:\n{out[-2000:]}"
    return np.array([float(v) for v in m.group(1).split()])


def check_demo(out, tmp_path):
    """BatchNorm (and renorm) train the ConvNet that fails to train without it in the same steps."""
    no_bn, bn = number(r"^\| no BN\s*\|\s*([\d.]+)", out), number(r"^\| BatchNorm\s*\|\s*([\d.]+)", out)
    renorm = number(r"^\| renorm\s*\|\s*([\d.]+)", out)
    assert bn >= 0.9 and renorm >= 0.9, (bn, renorm)
    assert bn > no_bn + 0.2, (bn, no_bn)
    assert (tmp_path / "demo.png").stat().st_size > 0


def check_equinox(out, tmp_path):
    """Swapping the class trains alike; jaxbn fixes equinox's inference before training and its debias."""
    eqx_acc, ours_acc = number(r"^\s+60\s+([\d.]+)\s+([\d.]+)$", out), number(r"^\s+60\s+([\d.]+)\s+([\d.]+)$", out, 2)
    assert ours_acc >= 0.6 and abs(ours_acc - eqx_acc) <= 0.1, (ours_acc, eqx_acc)
    before = out[out.index("inference before any training step"):]
    assert abs(number(r"jaxbn\.equinox\.BatchNorm\s+([\d.]+)", before) - 1.0) < 0.01  # the identity
    assert number(r"eqx\.nn\.BatchNorm\s+([\d.]+)", before) > 10.0  # equinox's var 0: 1 / sqrt(eps)
    ema = number(r"float64 EMA of the batch variances ([\d.]+)", out)
    ours = number(r"jaxbn\.equinox\.BatchNorm\s+variance used in inference\s+([\d.]+)", out)
    theirs = number(r"eqx\.nn\.BatchNorm\s+variance used in inference\s+([\d.]+)", out)
    assert abs(ours - ema) <= 1e-3 * ema < abs(theirs - ema), (ours, theirs, ema)


def check_fold(out, tmp_path):
    """The folded layer and model give the batch-normed outputs to float32 rounding."""
    assert number(r"max \|conv\+BN - folded conv\| = ([\d.e+-]+)", out) < 1e-4
    diff, scale = number(r"max \|logits diff\| = ([\d.e+-]+)", out), number(r"logits up to ([\d.]+)", out)
    assert diff <= 1e-5 * max(1.0, scale)
    assert number(r"same prediction on ([\d.]+)%", out) == 100.0


def check_haiku(out, tmp_path):
    """Same training as haiku; the large-offset, bf16 and inf faults fixed, against float64."""
    hk_acc = number(r"hk\.BatchNorm\s+test accuracy ([\d.]+)", out)
    ours_acc = number(r"jaxbn\.haiku\.BatchNorm\s+test accuracy ([\d.]+)", out)
    assert ours_acc >= 0.6 and abs(ours_acc - hk_acc) <= 0.02, (ours_acc, hk_acc)
    assert "checkpoints interchange): True" in out
    part2, part3, part4 = (out[out.index(f"\n{k}."):] for k in (2, 3, 4))
    truth = vector(r"float64 truth", part2)
    np.testing.assert_allclose(vector(r"jaxbn\.haiku\.BatchNorm", part2), truth, rtol=1e-3)
    assert number(r"jaxbn\.haiku\.BatchNorm\s+\[[^\]]*\]\s+NaN outputs: (\d+)", part2) == 0
    assert number(r"hk\.BatchNorm\s+\[[^\]]*\]\s+NaN outputs: (\d+)", part2) > 0
    np.testing.assert_allclose(vector(r"jaxbn\.haiku\.BatchNorm", part3), vector(r"float64 truth", part3), rtol=1e-3)
    assert number(r"jaxbn\.haiku\.BatchNorm\s+\[[^\]]*\]\s+float32\s+([\d.e+-]+)", part3) < 1e-5
    good = vector(r"float64, good batch", part4)
    np.testing.assert_allclose(vector(r"jaxbn\.haiku\.BatchNorm", part4), good, rtol=1e-3)


def check_multihost(out, tmp_path):
    """Two processes, 4 devices: pmap and the global-mesh jit equal one device on the whole batch."""
    one = number(r"^\| one device, whole batch\s*\|\s*([\d.]+)", out)
    for run in ("pmap, axis_name='batch'", "jit, 4-device global mesh"):
        row = re.escape(run)
        assert abs(number(rf"^\| {row}\s*\|\s*([\d.]+)", out) - one) < 1e-3
        assert number(rf"^\| {row}\s*\|\s*[\d.]+\s*\|\s*([\d.e+-]+)", out) < 1e-5


def check_nnx(out, tmp_path):
    """An NNX ConvNet trains; precise BN statistics do at least as well as the EMA's (within noise)."""
    ema = number(r"test accuracy, running \(EMA\) statistics:\s+([\d.]+)", out)
    precise = number(r"test accuracy, recomputed \(precise\) statistics:\s+([\d.]+)", out)
    assert ema >= 0.6 and precise >= 0.6 and precise >= ema - 0.05, (ema, precise)


def check_quickstart(out, tmp_path):
    """Training output normalized; the running stats reach the data's; eval output normalized too."""
    assert abs(number(r"train output mean ([+-][\d.]+)", out)) < 1e-3
    assert abs(number(r"train output mean [+-][\d.]+, std ([\d.]+)", out) - 1.0) < 1e-2
    assert abs(number(r"running mean ([+-]?[\d.]+)", out) - number(r"running mean [+-]?[\d.]+ \(true ([+-]?[\d.]+)\)",
                                                                    out)) <= 0.02
    var, true_var = number(r"running var ([\d.]+)", out), number(r"running var [\d.]+ \(true ([\d.]+)\)", out)
    assert abs(var - true_var) <= 0.01 * true_var
    assert abs(number(r"eval output std ([\d.]+)", out) - 1.0) < 0.05
    assert number(r"updates applied: (\d+)", out) == 200


def check_recompute(out, tmp_path):
    """Recomputed statistics rescue the averaged weights that the last model's statistics mislead."""
    before = number(r"SWA weights: ([\d.]+) with stale", out)
    after = number(r"-> ([\d.]+) after recompute_batch_stats", out)
    assert after >= 0.6 and after >= before - 0.02, (before, after)


def check_sync(out, tmp_path):
    """Sync-BN on 8 devices with 4 examples each equals one big batch; unsynchronized BN does not."""
    sync = number(r"sync-BN matches the big batch to ([\d.e+-]+)", out)
    local = number(r"unsynchronized BN is ([\d.e+-]+) away", out)
    assert sync < 1e-3 < local, (sync, local)
    assert number(r"^\| big batch\s*\|\s*[\d.]+\s*\|\s*([\d.]+)", out) >= 0.5


def check_torch(out, tmp_path):
    """PyTorch weights give PyTorch's logits in Linen (NHWC) and the functional API (NCHW)."""
    assert number(r"jaxbn\.linen\.BatchNorm .*= ([\d.e+-]+)", out) < 1e-4
    assert number(r"jaxbn\.batch_norm .*= ([\d.e+-]+)", out) < 1e-4
    assert number(r"PyTorch momentum 0\.1 -> jaxbn momentum ([\d.]+)", out) == 0.9


def check_grad_accumulation(out, tmp_path):
    """Accumulated statistics equal the float64 whole-batch update; per-micro-batch updates do not (they miss
    the spread of the micro-batch means and apply the momentum k times)."""
    assert "equal the whole-batch update (float64 reference): True" in out, out
    assert number(r"worst error with jaxbn accumulation: (\S+);", out) < 1e-5
    assert number(r"smallest with per-micro-batch updates: (\S+)", out) > 1e-2


def check_convert_pretrained(out, tmp_path):
    """A model with flax's own layers, converted and frozen without an edit: its new head learns; the running
    statistics, the backbone and the variable tree are exactly unchanged."""
    assert number(r"test accuracy ([\d.]+)", out) >= 0.6
    for what in ("running statistics", "backbone parameters", "variable tree"):
        assert re.search(rf"^{what} unchanged.*: True$", out, re.M), out


CHECKS = {
    "convert_pretrained.py": check_convert_pretrained,
    "demo.py": check_demo,
    "equinox_example.py": check_equinox,
    "fold_inference.py": check_fold,
    "grad_accumulation.py": check_grad_accumulation,
    "haiku_example.py": check_haiku,
    "multihost.py": check_multihost,
    "nnx_example.py": check_nnx,
    "quickstart.py": check_quickstart,
    "recompute_stats.py": check_recompute,
    "sync_bn.py": check_sync,
    "torch_weights.py": check_torch,
}


def test_every_example_has_a_check():
    assert sorted(CHECKS) == EXAMPLES, "a new example needs a check of what it shows in CHECKS"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    env = dict(os.environ, JAXBN_FAST="1", MPLBACKEND="Agg", JAXBN_OUT=str(tmp_path))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    CHECKS[name](proc.stdout, tmp_path)
