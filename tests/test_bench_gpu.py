"""`python -m benchmarks gpu`: refuses to run without a GPU; `--allow-cpu --quick` runs its machinery end to end."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "benchmarks", "gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip


def test_no_gpu_exits_2_with_a_message():
    res = _run()
    assert res.returncode == 2
    assert "no GPU: jax.default_backend() is 'cpu'" in res.stderr


def test_allow_cpu_quick_smoke_run(tmp_path):
    out = tmp_path / "gpu.json"
    res = _run("--allow-cpu", "--quick", "--reps", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-4000:]
    rep = json.loads(out.read_text())
    assert {"meta", "layer", "model", "conditionals", "check"} <= set(rep)
    assert rep["conditionals"] == 0 and rep["check"] == "PASS" and "PASS" in res.stdout
    assert {r["dtype"] for r in rep["layer"]["results"]} == {"float32", "bfloat16"}
    assert {r["impl"] for r in rep["layer"]["results"]} == {"jaxbn", "flax"}
    rows = {r["impl"]: r for r in rep["model"]["results"]}
    assert {"flax", "jaxbn.linen", "identity"} == set(rows)
    for r in rows.values():
        assert r["median_ms"] > 0 and r["compile_s"] > 0 and r["temp_bytes"] >= 0
    assert "| model | impl | step ms |" in res.stdout
