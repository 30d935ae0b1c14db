"""Benchmark jaxbn against flax.linen.BatchNorm, haiku.BatchNorm and equinox.nn.BatchNorm.

Run ``python -m jaxbn.benchmark`` (``--help`` for the options). Every
implementation runs side by side in one process, on the same data, with
repetitions interleaved (each round times every implementation and mode
once, in a fresh random order), so a change of machine load hits all of
them alike. For each grid row (shape, dtype) it times three jitted
programs:

* ``train``: training forward, ``y`` and the updated running statistics;
* ``train+grad``: training forward and backward, ``y``, the updated
  statistics and the gradients with respect to ``x``, ``scale`` and ``bias``
  for a given output cotangent (``jax.vjp``);
* ``infer``: inference forward with the running statistics.

Times are medians over repetitions after compilation and warm-up, each call
ended with ``block_until_ready``. The speedup of an implementation on a row
is ``flax time / its time`` (``flax`` = ``flax.linen.BatchNorm`` with default
options, so > 1 is faster than flax), summarized by the geometric mean.

It also reports, per implementation, the bytes the backward pass keeps per
layer (the residuals of ``jax.vjp`` of the training forward, as a multiple
of the input's bytes), and the collectives (all-reduce, all-gather, ...) in
the compiled HLO of a synchronized training forward + backward under
``jax.shard_map`` (in a subprocess with 8 simulated CPU devices when this
process has a single device).

haiku and equinox are optional: rows for them appear when they are installed.
tqdm (progress bar) and matplotlib (``--plot``) are optional too.

>>> [c.key for c in GRID]
['dense', 'nhwc56', 'nhwc28', 'nhwc14', 'nhwc7', 'nchw28']
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: The timed programs, in table order.
MODES = ("train", "train+grad", "infer")
MODE_TITLES = {
    "train": "training forward (y, updated stats)",
    "train+grad": "training forward + backward (y, stats, d/dx, d/dscale, d/dbias)",
    "infer": "inference forward (running stats)",
}
#: The implementation every speedup is relative to.
REFERENCE = "flax"
#: Implementations other than jaxbn: the "anchors".
ANCHORS = ("flax", "flax-exact", "haiku", "equinox")
COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


@dataclasses.dataclass(frozen=True)
class Case:
    """One grid shape: `x.shape` and its feature axis."""

    key: str
    shape: tuple[int, ...]
    axis: int

    @property
    def layout(self) -> str:
        if len(self.shape) == 2:
            return "dense"
        return "NCHW" if self.axis == 1 else "NHWC"

    @property
    def label(self) -> str:
        return f"{self.layout} {'x'.join(map(str, self.shape))}"


#: The default grid (issue 6).
GRID = (
    Case("dense", (4096, 1024), -1),
    Case("nhwc56", (64, 56, 56, 64), -1),
    Case("nhwc28", (128, 28, 28, 128), -1),
    Case("nhwc14", (128, 14, 14, 256), -1),
    Case("nhwc7", (128, 7, 7, 512), -1),
    Case("nchw28", (128, 128, 28, 28), 1),
)
#: Tiny shapes for `--quick` (smoke test, not a measurement).
QUICK_GRID = (
    Case("dense", (64, 32), -1),
    Case("nhwc", (8, 4, 4, 16), -1),
    Case("nchw", (8, 16, 4, 4), 1),
)
DTYPES = ("float32", "bfloat16")


# --------------------------------------------------------------------------- implementations


@dataclasses.dataclass
class Layer:
    """One batch-norm layer of some library, as pure functions.

    `apply(params, state, x, training)` returns `(y, new_state)`; `params`
    holds scale and bias (what is differentiated besides `x`); `prepare`
    turns the benchmark's input into the layout the library takes natively
    (equinox: channels first), outside the timed region.
    """

    params: Any
    state: Any
    apply: Callable[[Any, Any, jax.Array, bool], tuple[jax.Array, Any]]
    prepare: Callable[[jax.Array], jax.Array] = lambda x: x


Builder = Callable[[tuple[int, ...], int, Any, "str | None"], Layer]


def _small(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """`shape` with every non-feature axis cut to 2 (for cheap `init`)."""
    feat = axis % len(shape)
    return tuple(s if a == feat else min(s, 2) for a, s in enumerate(shape))


def _jaxbn(shape: tuple[int, ...], axis: int, dtype: Any, axis_name: str | None) -> Layer:
    import jaxbn

    c = shape[axis]
    params = {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}

    def apply(p: Any, s: Any, x: jax.Array, training: bool) -> tuple[jax.Array, Any]:
        return jaxbn.batch_norm(x, s, p["scale"], p["bias"], training=training, axis=axis, axis_name=axis_name)

    return Layer(params, jaxbn.init_stats(c), apply)


def _flax(fast_variance: bool, jaxbn_module: bool = False) -> Builder:
    def build(shape: tuple[int, ...], axis: int, dtype: Any, axis_name: str | None) -> Layer:
        if jaxbn_module:
            from jaxbn import linen as nn
        else:
            import flax.linen as nn  # type: ignore[no-redef]

        module = nn.BatchNorm(axis=axis, dtype=dtype, axis_name=axis_name, use_fast_variance=fast_variance)
        variables = module.init(jax.random.key(0), jnp.zeros(_small(shape, axis), dtype), use_running_average=True)

        def apply(p: Any, s: Any, x: jax.Array, training: bool) -> tuple[jax.Array, Any]:
            v = {"params": p, "batch_stats": s}
            if not training:
                y: Any = module.apply(v, x, use_running_average=True)
                return y, s
            y, upd = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        return Layer(variables["params"], variables["batch_stats"], apply)

    return build


def _haiku(shape: tuple[int, ...], axis: int, dtype: Any, axis_name: str | None) -> Layer:
    import haiku as hk

    fmt = "channels_first" if axis % len(shape) == 1 and len(shape) > 2 else "channels_last"

    def make(name: str | None) -> Any:
        def fn(x: jax.Array, training: bool) -> jax.Array:
            bn = hk.BatchNorm(True, True, 0.99, eps=1e-5, data_format=fmt, cross_replica_axis=name)
            return bn(x, is_training=training).astype(x.dtype)

        return hk.transform_with_state(fn)

    t = make(axis_name)
    # init outside any named axis (same variables); apply with the cross-replica axis.
    params, state = make(None).init(jax.random.PRNGKey(0), jnp.zeros(_small(shape, axis), dtype), True)

    def apply(p: Any, s: Any, x: jax.Array, training: bool) -> tuple[jax.Array, Any]:
        return t.apply(p, s, None, x, training)

    return Layer(params, state, apply)


def _equinox(shape: tuple[int, ...], axis: int, dtype: Any, axis_name: str | None) -> Layer:
    import equinox as eqx

    feat = axis % len(shape)
    vname = "_bench_batch"
    names = vname if axis_name is None else (vname, axis_name)
    model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(shape[feat], axis_name=names, mode="batch")
    params = {"scale": model.weight, "bias": model.bias}

    def apply(p: Any, s: Any, x: jax.Array, training: bool) -> tuple[jax.Array, Any]:
        m = eqx.tree_at(lambda m: (m.weight, m.bias), model, (p["scale"], p["bias"]))

        def one(xi: jax.Array, st: Any) -> tuple[jax.Array, Any]:
            return m(xi, st, inference=not training)

        y, new = jax.vmap(one, axis_name=vname, in_axes=(0, None), out_axes=(0, None))(x, s)
        return y.astype(x.dtype), new

    # equinox takes one example at a time, channels first: give it that layout.
    return Layer(params, state, apply, prepare=lambda x: jnp.moveaxis(x, feat, 1) if feat != 1 else x)


#: name -> (module that must import, builder, description)
IMPLEMENTATIONS: dict[str, tuple[str, Builder, str]] = {
    "jaxbn": ("jaxbn", _jaxbn, "jaxbn.batch_norm (fused closed-form derivative)"),
    "jaxbn.linen": ("jaxbn.linen", _flax(True, jaxbn_module=True), "jaxbn.linen.BatchNorm (drop-in for flax's)"),
    "flax": ("flax", _flax(True), "flax.linen.BatchNorm (default: use_fast_variance=True)"),
    "flax-exact": ("flax", _flax(False), "flax.linen.BatchNorm(use_fast_variance=False)"),
    "haiku": ("haiku", _haiku, "haiku.BatchNorm (create_scale, create_offset)"),
    "equinox": ("equinox", _equinox, "equinox.nn.BatchNorm(mode='batch') under jax.vmap, channels first"),
}


def available(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Splits `names` into importable implementations and `{name: reason}` for the others."""
    ok, skipped = [], {}
    for name in names:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")
        try:
            importlib.import_module(IMPLEMENTATIONS[name][0])
        except ImportError as e:
            skipped[name] = f"not installed ({e})"
        else:
            ok.append(name)
    return ok, skipped


# --------------------------------------------------------------------------- programs


def programs(layer: Layer) -> dict[str, Callable[..., Any]]:
    """The three timed functions of `layer` (not yet jitted), keyed by mode.

    `train(x, p, s)`, `train+grad(x, p, s, ct)`, `infer(x, p, s)`.
    """

    def train(x: jax.Array, p: Any, s: Any) -> tuple[jax.Array, Any]:
        return layer.apply(p, s, x, True)

    def train_grad(x: jax.Array, p: Any, s: Any, ct: jax.Array) -> Any:
        y, vjp, new = jax.vjp(lambda x, p: layer.apply(p, s, x, True), x, p, has_aux=True)
        dx, dp = vjp(ct)
        return y, new, dx, dp

    def infer(x: jax.Array, p: Any, s: Any) -> jax.Array:
        return layer.apply(p, s, x, False)[0]

    return {"train": train, "train+grad": train_grad, "infer": infer}


def residual_bytes(layer: Layer, x: jax.Array, features: int) -> tuple[int, int]:
    """Bytes of the residuals `jax.vjp` keeps for the training forward (traced, nothing runs).

    Each distinct residual array counts once; `x` counts if it is kept.

    Returns:
      `(batch_sized, small)`: bytes of the residuals with more elements than
      `features` (they grow with the batch) and of the others (per-feature
      vectors, scalars).
    """

    def residuals(x: jax.Array, p: Any) -> list[jax.Array]:
        _, vjp, _ = jax.vjp(lambda x, p: layer.apply(p, layer.state, x, True), x, p, has_aux=True)
        return jax.tree_util.tree_leaves(vjp)

    closed = jax.make_jaxpr(residuals)(x, layer.params)
    seen: set[int] = set()
    big = small = 0
    for v in closed.jaxpr.outvars:
        aval = getattr(v, "aval", None)
        if aval is None or id(v) in seen or not hasattr(aval, "shape"):
            continue
        seen.add(id(v))
        size = math.prod(aval.shape)
        nbytes = size * np.dtype(aval.dtype).itemsize
        if size > features:
            big += nbytes
        else:
            small += nbytes
    return big, small


# --------------------------------------------------------------------------- collectives


_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVE_KINDS) + r")(-start)?\(")


def _count(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """Collectives by kind in the compiled HLO of `jax.jit(fn)(*args)`."""
    try:
        from jaxbn.collectives import count_collectives
    except ImportError:  # pragma: no cover - older checkouts
        text = jax.jit(fn).lower(*args).compile().as_text() or ""
        counts = dict.fromkeys(COLLECTIVE_KINDS, 0)
        for m in _COLLECTIVE_RE.finditer(text):
            counts[m.group(1)] += 1
        return counts
    return {k: int(v) for k, v in count_collectives(fn, *args).items()}


def collectives_here(names: Sequence[str], per_device: int = 4, features: int = 64) -> dict[str, dict[str, Any]]:
    """Collectives of a synchronized training forward + backward, per implementation, on this process's devices.

    One layer on NHWC float32 input `(devices * per_device, 4, 4, features)`
    sharded over a 1-D mesh axis ``"batch"`` with `jax.shard_map`. An
    implementation that fails gets `{"error": message}` instead of counts.
    """

    n = jax.device_count()
    if n < 2:
        raise RuntimeError("collectives_here needs >= 2 devices")
    mesh = jax.make_mesh((n,), ("batch",))
    local = (per_device, 4, 4, features)
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            out[name] = _collectives_of(name, mesh, local, rng)
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


def _collectives_of(name: str, mesh: Any, local: tuple[int, ...], rng: Any) -> dict[str, int]:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n, per_device, features = mesh.size, local[0], local[-1]
    layer = IMPLEMENTATIONS[name][1](local, -1, jnp.float32, "batch")
    x = layer.prepare(jnp.asarray(rng.normal(size=(n * per_device, 4, 4, features)), jnp.float32))
    x = jax.device_put(x, NamedSharding(mesh, P("batch")))
    ct = jax.device_put(jnp.ones_like(x), NamedSharding(mesh, P("batch")))
    step = programs(layer)["train+grad"]
    d, r = P("batch"), P()
    fn = jax.shard_map(step, mesh=mesh, in_specs=(d, r, r, d), out_specs=(d, r, d, r), check_vma=False)
    return _count(fn, x, layer.params, layer.state, ct)


def collectives(names: Sequence[str], devices: int = 8, timeout: float = 600) -> dict[str, dict[str, Any]]:
    """`collectives_here`, in this process if it has >= 2 devices, else in a subprocess with `devices` CPU devices."""
    if jax.device_count() >= 2:
        return collectives_here(names)
    from jaxbn.collectives import cpu_devices_env

    env = cpu_devices_env(devices)
    cmd = [sys.executable, "-m", "jaxbn.benchmark", "--collectives-only", "--impls", ",".join(names)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with code {res.returncode}:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- timing


def _progress(total: int, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc="jaxbn.benchmark", unit="run", file=sys.stderr, dynamic_ncols=True)

    class _Null:
        def update(self, n: int = 1) -> None:
            pass

        def set_postfix_str(self, s: str) -> None:
            pass

        def close(self) -> None:
            pass

    return _Null()


def _orders(items: Sequence[Any], reps: int, seed: int = 0) -> Iterator[list[Any]]:
    """`reps` orderings of `items` (interleaving): a fresh random permutation each round.

    A random order (rather than a fixed or rotated one) keeps any job from
    always following the same other job, whose leftovers (freed memory,
    cache, clock) would otherwise bias it the same way every round.
    """
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        yield [items[i] for i in rng.permutation(len(items))]


def _prepare_jobs(
    name: str, case: Case, dt: Any, x0: jax.Array, key: jax.Array, modes: Sequence[str], warmup: int, bar: Any
) -> tuple[list[tuple[str, str, Callable[[], Any]]], tuple[float, int]]:
    """Builds, compiles and warms up one implementation's programs; returns them and its residuals."""
    layer = IMPLEMENTATIONS[name][1](case.shape, case.axis, dt, None)
    x = layer.prepare(x0)
    progs = programs(layer)
    y_aval = jax.eval_shape(progs["train"], x, layer.params, layer.state)[0]
    ct = jax.random.normal(jax.random.fold_in(key, 1), y_aval.shape, jnp.float32).astype(y_aval.dtype)
    big, small = residual_bytes(layer, x, case.shape[case.axis])
    jobs = []
    for mode in modes:
        args = (x, layer.params, layer.state) + ((ct,) if mode == "train+grad" else ())
        compiled = jax.jit(progs[mode]).lower(*args).compile()
        call = (lambda c, a: lambda: c(*a))(compiled, args)
        for _ in range(warmup):
            jax.block_until_ready(call())
            bar.update(1)
        jobs.append((name, mode, call))
    return jobs, (big / x.nbytes, small)


def time_case(
    case: Case,
    dtype: str,
    names: Sequence[str],
    reps: int,
    warmup: int,
    modes: Sequence[str],
    bar: Any,
    seed: int = 0,
    failed: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Times every implementation and mode on one (shape, dtype), interleaved. Returns result rows.

    An implementation that fails to build or compile is left out of the rows
    and its error recorded in `failed` (re-raised when `failed` is None).
    """
    dt = jnp.dtype(dtype)
    key = jax.random.key(seed)
    x0 = (jax.random.normal(key, case.shape, jnp.float32) * 2.0 + 0.5).astype(dt)
    jobs: list[tuple[str, str, Callable[[], Any]]] = []
    resid: dict[str, tuple[float, int]] = {}
    for name in names:
        try:
            more, resid[name] = _prepare_jobs(name, case, dt, x0, key, modes, warmup, bar)
        except Exception as e:
            if failed is None:
                raise
            failed[name] = f"failed on {case.key} {dtype}: {type(e).__name__}: {e}"[:500]
            continue
        jobs.extend(more)
    times: dict[tuple[str, str], list[float]] = {(n, m): [] for n, m, _ in jobs}
    for order in _orders(jobs, reps, seed):
        for name, mode, call in order:
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[(name, mode)].append(time.perf_counter() - t0)
            bar.update(1)
    rows = []
    for name, mode, _ in jobs:
        ts = times[(name, mode)]
        rows.append(
            {
                "case": case.key,
                "shape": list(case.shape),
                "axis": case.axis,
                "layout": case.layout,
                "dtype": dtype,
                "mode": mode,
                "impl": name,
                "median_ms": statistics.median(ts) * 1e3,
                "times_ms": [t * 1e3 for t in ts],
                "residual_multiple": resid[name][0],
                "residual_small_bytes": resid[name][1],
            }
        )
    return rows


def _geomean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def _match(r: dict[str, Any], mode: str, impl: str, dtype: str) -> bool:
    return r["mode"] == mode and r["impl"] == impl and dtype in ("all", r["dtype"])


def summarize(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Adds `speedup_vs_flax` and `vs_best_anchor` to `rows`; returns geometric means and target checks."""
    index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    anchors = [a for a in ANCHORS if a in names]
    for r in rows:
        ref = index.get((r["case"], r["dtype"], r["mode"], REFERENCE))
        r["speedup_vs_flax"] = ref["median_ms"] / r["median_ms"] if ref else None
        best = [index[k]["median_ms"] for a in anchors if (k := (r["case"], r["dtype"], r["mode"], a)) in index]
        r["vs_best_anchor"] = min(best) / r["median_ms"] if best else None
    geo: dict[str, dict[str, dict[str, float | None]]] = {}
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    for mode in modes:
        geo[mode] = {}
        for dt in [*dtypes, "all"]:
            geo[mode][dt] = {n: _geomean([r["speedup_vs_flax"] for r in rows if _match(r, mode, n, dt)]) for n in names}
    slow = [
        {k: r[k] for k in ("case", "dtype", "mode", "median_ms", "vs_best_anchor")}
        for r in rows
        if r["impl"] == "jaxbn" and r["vs_best_anchor"] is not None and r["vs_best_anchor"] < 1 / 1.05
    ]
    resid: dict[str, dict[str, float]] = {}
    for r in rows:
        d = resid.setdefault(r["impl"], {})
        d[r["dtype"]] = max(d.get(r["dtype"], 0.0), r["residual_multiple"])
    fb = geo.get("train+grad", {}).get("all", {}).get("jaxbn")
    return {
        "geomean_speedup_vs_flax": geo,
        "residual_multiple": resid,
        "targets": {
            "train+grad geomean speedup vs flax >= 1.25": None if fb is None else fb >= 1.25,
            "jaxbn rows slower than the fastest anchor by > 5%": slow,
            "jaxbn residuals <= 1.0x input": all(v <= 1.0 + 1e-9 for v in resid.get("jaxbn", {}).values()),
        },
    }


# --------------------------------------------------------------------------- output


def metadata(argv: Sequence[str]) -> dict[str, Any]:
    """Machine, date, versions and the command line."""
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "haiku", "equinox", "numpy", "jaxbn"):
        try:
            versions[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except ImportError:
            versions[mod] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m jaxbn.benchmark " + " ".join(argv),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)),
            "devices": jax.device_count(),
            "python": platform.python_version(),
        },
        "versions": versions,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _fmt_speed(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable tables."""
    names = report["implementations"]
    rows = report["results"]
    index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    cases = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    labels = {r["case"]: f"{r['layout']} {'x'.join(map(str, r['shape']))}" for r in rows}
    out = []
    meta = report["meta"]
    out.append(
        f"jaxbn.benchmark  {meta['date_utc']}  {meta['machine']['cpu']} ({meta['machine']['cpu_count']} cpus, "
        f"{meta['machine']['backend']})  jax {meta['versions']['jax']}  flax {meta['versions']['flax']}"
    )
    out.append(f"command: {meta['command']}")
    cfg = report["config"]
    out.append(
        f"median of {cfg['reps']} interleaved reps after {cfg['warmup']} warm-up; "
        "cell = ms (speedup vs flax = flax ms / ms, > 1 is faster); "
        "'best anchor' = fastest non-jaxbn ms / jaxbn ms"
    )
    w0 = max([len(labels[c]) + 10 for c, _ in cases] + [24])
    for mode in dict.fromkeys(r["mode"] for r in rows):
        out.append("")
        out.append(f"== {mode}: {MODE_TITLES[mode]} ==")
        head = f"{'shape':<{w0}}" + "".join(f"{n:>19}" for n in names) + f"{'best anchor':>13}"
        out.append(head)
        out.append("-" * len(head))
        for case, dt in cases:
            cells = []
            for n in names:
                r = index.get((case, dt, mode, n))
                speed = "" if r is None else _fmt_speed(r["speedup_vs_flax"])
                cells.append(f"{'-':>19}" if r is None else f"{r['median_ms']:9.2f} ({speed:>6})")
            jb = index.get((case, dt, mode, "jaxbn"))
            mark = ""
            if jb and jb["vs_best_anchor"] is not None and jb["vs_best_anchor"] < 1 / 1.05:
                mark = " <"
            best = _fmt_speed(jb["vs_best_anchor"]) if jb else "-"
            out.append(f"{labels[case] + ' ' + dt:<{w0}}" + "".join(f"{c:>19}" for c in cells) + f"{best + mark:>13}")
        geo = report["summary"]["geomean_speedup_vs_flax"][mode]
        for dt, vals in geo.items():
            out.append(f"{'geomean speedup ' + dt:<{w0}}" + "".join(f"{_fmt_speed(vals.get(n)):>19}" for n in names))
    out.append("")
    out.append(
        "== memory kept for the backward pass: residuals of jax.vjp that grow with the batch, "
        "as a multiple of x's bytes (max over rows; per-feature vectors not counted) =="
    )
    resid = report["summary"]["residual_multiple"]
    dts = list(dict.fromkeys(r["dtype"] for r in rows))
    out.append(f"{'implementation':<14}" + "".join(f"{d:>12}" for d in dts))
    for n in names:
        out.append(f"{n:<14}" + "".join(f"{resid.get(n, {}).get(d, float('nan')):>11.2f}x" for d in dts))
    coll = report.get("collectives")
    if coll:
        out.append("")
        out.append(
            f"== collectives in a synchronized train+grad step (shard_map over {coll['devices']} devices, "
            "compiled HLO) =="
        )
        if "error" in coll:
            out.append(f"not measured: {coll['error']}")
        else:
            out.append(f"{'implementation':<14}" + "".join(f"{k:>20}" for k in COLLECTIVE_KINDS) + f"{'total':>8}")
            for n, c in coll["counts"].items():
                if "error" in c:
                    out.append(f"{n:<14}not measured: {c['error']}")
                    continue
                out.append(
                    f"{n:<14}" + "".join(f"{c.get(k, 0):>20}" for k in COLLECTIVE_KINDS) + f"{sum(c.values()):>8}"
                )
    if report["skipped"]:
        out.append("")
        out.extend(f"skipped {n}: {why}" for n, why in report["skipped"].items())
    t = report["summary"]["targets"]
    out.append("")
    out.append("targets:")
    out.append(f"  train+grad geomean speedup vs flax >= 1.25: {t['train+grad geomean speedup vs flax >= 1.25']}")
    slow = t["jaxbn rows slower than the fastest anchor by > 5%"]
    out.append(f"  jaxbn rows slower than the fastest anchor by > 5% (marked <): {len(slow)}")
    out.append(f"  jaxbn residuals <= 1.0x input: {t['jaxbn residuals <= 1.0x input']}")
    return "\n".join(out)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (what docs/benchmark.md shows)."""
    names = report["implementations"]
    rows = report["results"]
    index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    cases = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    labels = {r["case"]: f"{r['layout']} {'x'.join(map(str, r['shape']))}" for r in rows}
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        out.append(f"**{mode}**: {MODE_TITLES[mode]}. Median ms (speedup vs flax).\n")
        out.append("| shape | dtype | " + " | ".join(names) + " | jaxbn vs best anchor |")
        out.append("|---|---|" + "---:|" * (len(names) + 1))
        for case, dt in cases:
            cells = []
            for n in names:
                r = index.get((case, dt, mode, n))
                cells.append("-" if r is None else f"{r['median_ms']:.2f} ({_fmt_speed(r['speedup_vs_flax'])})")
            jb = index.get((case, dt, mode, "jaxbn"))
            best = "-" if jb is None else _fmt_speed(jb["vs_best_anchor"])
            if jb and jb["vs_best_anchor"] is not None and jb["vs_best_anchor"] < 1 / 1.05:
                best = f"**{best}**"
            out.append(f"| {labels[case]} | {dt} | " + " | ".join(cells) + f" | {best} |")
        for dt, vals in report["summary"]["geomean_speedup_vs_flax"][mode].items():
            out.append(f"| geomean | {dt} | " + " | ".join(_fmt_speed(vals.get(n)) for n in names) + " | |")
        out.append("")
    resid = report["summary"]["residual_multiple"]
    dts = list(dict.fromkeys(r["dtype"] for r in rows))
    out.append("**Residuals** kept for the backward pass (batch-sized arrays, multiple of x's bytes):\n")
    out.append("| implementation | " + " | ".join(dts) + " |")
    out.append("|---|" + "---:|" * len(dts))
    for n in names:
        out.append(f"| {n} | " + " | ".join(f"{resid.get(n, {}).get(d, float('nan')):.2f}x" for d in dts) + " |")
    coll = report.get("collectives")
    if coll and "counts" in coll:
        out.append("")
        out.append(f"**Collectives** in a synchronized train+grad step ({coll['devices']} devices, compiled HLO):\n")
        out.append("| implementation | " + " | ".join(COLLECTIVE_KINDS) + " | total |")
        out.append("|---|" + "---:|" * (len(COLLECTIVE_KINDS) + 1))
        for n, c in coll["counts"].items():
            if "error" in c:
                out.append(f"| {n} | not measured: {c['error']} |" + " |" * len(COLLECTIVE_KINDS))
                continue
            out.append(f"| {n} | " + " | ".join(str(c.get(k, 0)) for k in COLLECTIVE_KINDS) + f" | {sum(c.values())} |")
    return "\n".join(out)


def plot(report: dict[str, Any], path: str) -> None:
    """Bar charts of the speedup vs flax per row, one panel per mode (matplotlib required)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["implementations"]
    rows = report["results"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    cases = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8, 1.1 * len(cases)), 3.2 * len(modes)), squeeze=False)
    width = 0.8 / max(len(names), 1)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        for i, n in enumerate(names):
            vals = [
                (index[(c, d, mode, n)]["speedup_vs_flax"] or 0.0) if (c, d, mode, n) in index else 0.0
                for c, d in cases
            ]
            ax.bar(np.arange(len(cases)) + i * width, vals, width, label=n)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(cases)) + width * (len(names) - 1) / 2)
        ax.set_xticklabels([f"{c}\n{d}" for c, d in cases], fontsize=7)
        ax.set_ylabel("speedup vs flax")
        ax.set_title(MODE_TITLES[mode], fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=len(names))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- driver


def _parse_cases(spec: str | None, quick: bool) -> list[Case]:
    grid = QUICK_GRID if quick else GRID
    if not spec:
        return list(grid)
    known = {c.key: c for c in ((*GRID, *QUICK_GRID) if quick else (*QUICK_GRID, *GRID))}
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in known:
            out.append(known[item])
            continue
        m = re.fullmatch(r"(\d+(?:x\d+)+)(?:@(-?\d+))?", item)
        if not m:
            raise ValueError(f"bad shape {item!r}: use one of {', '.join(known)} or e.g. 32x8x8x64@-1")
        shape = tuple(int(s) for s in m.group(1).split("x"))
        out.append(Case(item, shape, int(m.group(2) or -1)))
    return out


def run(
    cases: Sequence[Case],
    dtypes: Sequence[str],
    names: Sequence[str],
    reps: int,
    warmup: int = 1,
    modes: Sequence[str] = MODES,
    progress: bool = True,
    with_collectives: bool = True,
    argv: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs the benchmark; returns the report (what `--json` prints).

    Args:
      cases: grid shapes.
      dtypes: dtype names, e.g. ``("float32", "bfloat16")``.
      names: implementations (keys of `IMPLEMENTATIONS`); missing packages are skipped.
      reps: timed repetitions per program.
      warmup: untimed calls after compilation.
      modes: subset of `MODES`.
      progress: show a tqdm bar on stderr (if tqdm is installed).
      with_collectives: also count the collectives of a synchronized step.
      argv: the command line, recorded in the report.
    """
    meta = metadata(argv)
    names, skipped = available(names)
    total = len(cases) * len(dtypes) * len(names) * len(modes) * (reps + warmup)
    bar = _progress(total, progress)
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    try:
        for case in cases:
            for dt in dtypes:
                bar.set_postfix_str(f"{case.key} {dt}")
                live = [n for n in names if n not in failed]
                rows.extend(time_case(case, dt, live, reps, warmup, modes, bar, failed=failed))
    finally:
        bar.close()
    if "jaxbn" in failed:
        raise RuntimeError(f"jaxbn itself failed: {failed['jaxbn']}")
    # An implementation that failed anywhere is dropped everywhere (rows must be comparable).
    names = [n for n in names if n not in failed]
    rows = [r for r in rows if r["impl"] in names]
    skipped.update(failed)
    report: dict[str, Any] = {
        "meta": meta,
        "config": {
            "cases": [dataclasses.asdict(c) for c in cases],
            "dtypes": list(dtypes),
            "modes": list(modes),
            "reps": reps,
            "warmup": warmup,
            "reference": REFERENCE,
        },
        "implementations": list(names),
        "descriptions": {n: IMPLEMENTATIONS[n][2] for n in names},
        "skipped": skipped,
        "results": rows,
    }
    report["summary"] = summarize(rows, names)
    if with_collectives:
        devices = jax.device_count() if jax.device_count() >= 2 else 8
        try:
            report["collectives"] = {"devices": devices, "counts": collectives(names, devices)}
        except Exception as e:  # reported, not fatal: timings are still valid
            report["collectives"] = {"devices": devices, "error": f"{type(e).__name__}: {e}"[:2000]}
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Command line entry point: ``python -m jaxbn.benchmark [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m jaxbn.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and 2 reps: a smoke test, not a measurement")
    keys = ", ".join(c.key for c in GRID)
    p.add_argument("--shapes", help=f"comma-separated grid keys ({keys}) or AxBxC[@axis]")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes (default float32,bfloat16)")
    p.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="comma-separated implementations")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes: " + ", ".join(MODES))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per program (default 10; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compilation (default 1)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of tables")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables instead of plain text")
    p.add_argument("--from-json", metavar="PATH", help="re-print the report saved by --json (no run)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the speedups (needs matplotlib)")
    p.add_argument("--no-collectives", action="store_true", help="skip the synchronized-step collective count")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--collectives-only", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    names = [n for n in opts.impls.split(",") if n]
    if opts.collectives_only:
        names, _ = available(names)
        print(json.dumps(collectives_here(names)))
        return None
    if opts.from_json:
        with open(opts.from_json) as f:
            saved = json.load(f)
        print(format_markdown(saved) if opts.markdown else format_report(saved))
        return saved
    modes = [m for m in opts.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    reps = opts.reps if opts.reps is not None else (2 if opts.quick else 10)
    report = run(
        _parse_cases(opts.shapes, opts.quick),
        [d for d in opts.dtypes.split(",") if d],
        names,
        reps=reps,
        warmup=opts.warmup,
        modes=modes,
        progress=not opts.no_progress,
        with_collectives=not opts.no_collectives,
        argv=argv,
    )
    if opts.plot:
        try:
            plot(report, opts.plot)
        except ImportError as e:
            print(f"--plot skipped: matplotlib is not installed ({e})", file=sys.stderr)
    if opts.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_markdown(report) if opts.markdown else format_report(report))
    return report


if __name__ == "__main__":
    main()
