"""Every example runs (in its fast mode) so none can rot."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Examples whose output a test below checks (they run there, once).
CHECKED = {"grad_accumulation.py"}
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py") and f not in CHECKED)


def _run(name, tmp_path):
    env = dict(os.environ, JAXBN_FAST="1", MPLBACKEND="Agg", JAXBN_OUT=str(tmp_path))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    _run(name, tmp_path)


def test_grad_accumulation_matches_the_whole_batch(tmp_path):
    """The example's claim: accumulated statistics equal the float64 whole-batch update; per-micro-batch
    updates do not (they miss the spread of the micro-batch means and apply the momentum k times)."""
    out = _run("grad_accumulation.py", tmp_path)
    assert "equal the whole-batch update (float64 reference): True" in out, out
    worst = float(re.search(r"worst error with jaxbn accumulation: (\S+);", out).group(1))
    naive = float(re.search(r"smallest with per-micro-batch updates: (\S+)", out).group(1))
    assert worst < 1e-5 and naive > 1e-2, out
