"""The README comparison table's measured claims, re-measured: what each library's batch norm computes.

Two measurements, each against a float64 numpy reference computed here from the
definition, next to what each library returns:

* `offset_variance`: the batch variance of float32 ``1e4 + N(0, 1)`` data of
  shape (64, 16), the README's own example (`jax.random.key(seed)`, seeds
  0, 1, ...), as each library computes it in training mode (read off the
  running variance after one update at momentum 0; haiku: ``decay_rate=0``).
  flax's default ``E[x²] − E[x]²`` in float32 keeps no digit of a variance
  of 1 next to a mean square of 1e8 (float32 spacing there is 8): it returns
  a small multiple of 8, clamped at 0; haiku's, unclamped, can be negative,
  and its outputs are then NaN.
* `batch_mode_ema`: the variance `mode="batch"` layers use in inference after
  10 training steps at momentum 0.99 on batches of N(1, 3²) (16 examples, 4
  channels), read off the inference output (``var(x) / var(y) - eps``),
  next to the data's variance (9), the mean of the batch variances and their
  exponential moving average started from 1 (flax's and PyTorch's rule, not
  debiased). equinox divides its stored average by ``1 - 0.99**10``.
* `state_claims`: the dtype of the running statistics for bfloat16 input (with
  standard and with strict dtype promotion), and what a batch holding one
  ``inf`` leaves in them.

>>> r = offset_variance(seeds=1)
>>> r["flax"]["values"][0] % 8.0
0.0
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: The README example's data: float32 offset + N(0, 1) of this shape.
OFFSET, SHAPE = 1e4, (64, 16)
#: `batch_mode_ema`'s setup: momentum, steps, batch, channels, data mean and standard deviation.
MOMENTUM, STEPS, BATCH, CHANNELS, LOC, SD = 0.99, 10, 16, 4, 1.0, 3.0
EPS = 1e-5


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _values(v: np.ndarray) -> list[float]:
    """The distinct values of `v`, sorted (NaN last)."""
    v = np.asarray(v, np.float64).ravel()
    out = sorted({float(a) for a in v[np.isfinite(v)]})
    return out + ([float("nan")] if np.isnan(v).any() else [])


def offset_variance(seeds: int = 20) -> dict[str, Any]:
    """Each library's training-mode batch variance of `OFFSET` + N(0, 1) float32 data, over `seeds` seeds.

    Args:
      seeds: data sets ``OFFSET + jax.random.normal(jax.random.key(s), SHAPE)``, s = 0 .. seeds - 1.

    Returns:
      ``{"seeds", "shape", "offset", "true_var_range"}`` and per library (jaxbn,
      flax, haiku, equinox when installed) ``max_rel_error`` (largest
      ``|var - truth| / truth`` over seeds and features), ``values`` (the
      distinct variances returned, when there are at most 16) and
      ``nan_outputs`` (outputs that are NaN, of all seeds' outputs). jaxbn
      also gives ``max_rel_error_masked``: a random half of the rows masked out.
    """
    import flax.linen as nn

    import jaxbn

    c = SHAPE[1]
    got: dict[str, list[np.ndarray]] = {}
    nans: dict[str, int] = {}
    truths, masked_err = [], 0.0

    def add(name: str, var: jax.Array, y: jax.Array) -> None:
        got.setdefault(name, []).append(np.asarray(var, np.float64).reshape(c))
        nans[name] = nans.get(name, 0) + int(np.isnan(np.asarray(y, np.float64)).sum())

    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
    for s in range(seeds):
        x = OFFSET + jax.random.normal(jax.random.key(s), SHAPE)
        x64 = np.asarray(x, np.float64)
        truths.append(x64.var(axis=0))
        y, st = jaxbn.batch_norm(x, jaxbn.init_stats(c), training=True, momentum=0.0)
        add("jaxbn", st.var, y)
        mask = np.random.default_rng(s).random(SHAPE[0]) < 0.5
        _, st = jaxbn.batch_norm(x, jaxbn.init_stats(c), training=True, momentum=0.0, mask=jnp.asarray(mask)[:, None])
        masked_err = max(masked_err, float(np.max(np.abs(np.asarray(st.var) - x64[mask].var(0)) / x64[mask].var(0))))
        variables = flax_bn.init(jax.random.key(0), x)
        y, upd = flax_bn.apply(variables, x, mutable=["batch_stats"])
        add("flax", upd["batch_stats"]["var"], y)
        if _has("haiku"):
            y, var = _haiku(x)
            add("haiku", var, y)
        if _has("equinox"):
            y, var = _equinox(x)
            add("equinox", var, y)
    truth = np.stack(truths)
    out: dict[str, Any] = {
        "seeds": seeds,
        "shape": list(SHAPE),
        "offset": OFFSET,
        "true_var_range": [float(truth.min()), float(truth.max())],
    }
    for name, vs in got.items():
        v = np.stack(vs)
        distinct = _values(v)
        out[name] = {
            "max_rel_error": float(np.nanmax(np.abs(v - truth) / truth)) if np.isfinite(v).any() else float("nan"),
            "values": distinct if len(distinct) <= 16 else None,
            "nan_outputs": nans[name],
            "outputs": seeds * SHAPE[0] * c,
        }
    out["jaxbn"]["max_rel_error_masked"] = masked_err
    return out


def _haiku(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """haiku.BatchNorm's training output and batch variance (its moving variance at decay 0)."""
    import haiku as hk

    def fn(x: jax.Array) -> jax.Array:
        return hk.BatchNorm(True, True, 0.0, eps=EPS)(x, is_training=True)  # type: ignore[no-any-return]

    t = hk.transform_with_state(fn)
    params, state = t.init(None, x)
    y, state = t.apply(params, state, None, x)
    return y, state["batch_norm/~/var_ema"]["average"]  # type: ignore[index]


def _equinox(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """equinox.nn.BatchNorm's ("batch" mode) training output and batch variance (its running variance at momentum 0)."""
    import equinox as eqx

    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(x.shape[1], "b", mode="batch", momentum=0.0, eps=EPS)
    y, state = jax.vmap(bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))(x, state)
    return y, state.get(bn.batch_state_index)[1]  # type: ignore[arg-type]


def batch_mode_ema(seed: int = 0) -> dict[str, Any]:
    """The inference variance of batch-statistics layers after `STEPS` training steps at `MOMENTUM`.

    Data: `STEPS` batches of `BATCH` examples of N(`LOC`, `SD`²), `CHANNELS`
    channels, then one inference batch; every number is the mean over channels.

    Returns:
      ``data_var`` (SD², the data's variance), ``mean_batch_var`` (mean of the
      biased batch variances), ``ema`` (their float64 EMA from 1, not
      debiased), ``ema_debiased`` (``ema / (1 - momentum**steps)``), ``debias_excess``
      (``momentum**steps / (1 - momentum**steps)``: what the initial 1 adds once
      debiased) and the inference variance of ``flax`` (its running variance),
      ``jaxbn.linen`` (likewise), ``equinox`` and ``jaxbn.equinox`` (``mode="batch"``, read off the output).
    """
    import flax.linen as nn

    from jaxbn import linen as jbn

    rng = np.random.default_rng(seed)
    xs = [(LOC + SD * rng.normal(size=(BATCH, CHANNELS))).astype(np.float32) for _ in range(STEPS)]
    x_eval = (LOC + SD * rng.normal(size=(2 * BATCH, CHANNELS))).astype(np.float32)
    batch_vars = np.stack([x.astype(np.float64).var(axis=0) for x in xs])
    ema = np.ones(CHANNELS)
    for v in batch_vars:
        ema = MOMENTUM * ema + (1 - MOMENTUM) * v
    debias = 1 - MOMENTUM**STEPS
    out: dict[str, Any] = {
        "momentum": MOMENTUM,
        "steps": STEPS,
        "batch": BATCH,
        "channels": CHANNELS,
        "data_var": SD**2,
        "mean_batch_var": float(batch_vars.mean()),
        "ema": float(ema.mean()),
        "ema_debiased": float((ema / debias).mean()),
        "debias_excess": MOMENTUM**STEPS / debias,
    }
    for name, module in (("flax", nn.BatchNorm), ("jaxbn.linen", jbn.BatchNorm)):
        bn = module(use_running_average=False, momentum=MOMENTUM, epsilon=EPS)
        variables = bn.init(jax.random.key(0), jnp.asarray(xs[0]))
        for x in xs:
            _, upd = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
            variables = {**variables, **upd}
        out[name] = float(np.asarray(variables["batch_stats"]["var"], np.float64).mean())
    if _has("equinox"):
        import equinox as eqx

        mods = {"equinox": eqx.nn.BatchNorm, "jaxbn.equinox": importlib.import_module("jaxbn.equinox").BatchNorm}
        for name, cls in mods.items():
            bn, state = eqx.nn.make_with_state(cls)(CHANNELS, "b", mode="batch", momentum=MOMENTUM, eps=EPS)
            train = jax.vmap(bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))
            for x in xs:
                _, state = train(jnp.asarray(x), state)
            infer = jax.vmap(eqx.nn.inference_mode(bn), axis_name="b", in_axes=(0, None), out_axes=(0, None))
            y, _ = infer(jnp.asarray(x_eval), state)
            ratio = x_eval.astype(np.float64).var(axis=0) / np.asarray(y, np.float64).var(axis=0)
            out[name] = float((ratio - EPS).mean())
    return out


def _train_steps(name: str, xs: list[jax.Array]) -> Any:
    """The running variance of library `name` after one training step on each of `xs` (momentum 0.9)."""
    import flax.linen as nn

    import jaxbn

    if name == "jaxbn":
        stats = jaxbn.init_stats(xs[0].shape[-1])
        for x in xs:
            _, stats = jaxbn.batch_norm(x, stats, training=True, momentum=0.9)
        return stats.var
    if name == "flax":
        bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
        variables = bn.init(jax.random.key(0), xs[0])
        for x in xs:
            _, upd = bn.apply(variables, x, mutable=["batch_stats"])
            variables = {**variables, **upd}
        return variables["batch_stats"]["var"]
    if name == "haiku":
        import haiku as hk

        t = hk.transform_with_state(lambda x: hk.BatchNorm(True, True, 0.9, eps=EPS)(x, is_training=True))
        params, state = t.init(None, xs[0])
        for x in xs:
            _, state = t.apply(params, state, None, x)
        return state["batch_norm/~/var_ema"]["average"]  # type: ignore[index]
    import equinox as eqx

    eqx_bn, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(xs[0].shape[-1], "b", mode="batch", momentum=0.9)
    train = jax.vmap(eqx_bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))
    for x in xs:
        _, eqx_state = train(x, eqx_state)
    return eqx_state.get(eqx_bn.batch_state_index)[1]  # type: ignore[arg-type]


def state_claims() -> dict[str, Any]:
    """What each library's running statistics become: bf16 input, and a batch holding one inf.

    Returns:
      Per library (jaxbn, flax, haiku, equinox when installed): ``bf16_state_dtype``
      (the running variance's dtype after a training step on bfloat16 input),
      ``bf16_strict`` (the same under ``jax_numpy_dtype_promotion="strict"``: the dtype,
      or the exception's class name), and ``inf_var`` / ``inf_then_clean_var``
      (channel 0's running variance, which starts at 1 (equinox: 0), after a batch of
      N(0, 1) with one ``inf`` in channel 0, then after one more finite batch).
    """
    rng = np.random.default_rng(0)
    clean = [jnp.asarray(rng.normal(size=(32, 4)), jnp.float32) for _ in range(2)]
    bad = clean[0].at[3, 0].set(jnp.inf)
    bf16 = clean[0].astype(jnp.bfloat16)
    names = ["jaxbn", "flax"] + [n for n in ("haiku", "equinox") if _has(n)]
    out: dict[str, Any] = {}
    for name in names:
        with jax.numpy_dtype_promotion("standard"):
            r: dict[str, Any] = {"bf16_state_dtype": str(_train_steps(name, [bf16]).dtype)}
        try:
            with jax.numpy_dtype_promotion("strict"):
                r["bf16_strict"] = str(_train_steps(name, [bf16]).dtype)
        except Exception as e:  # what a user with strict promotion gets
            r["bf16_strict"] = type(e).__name__
        with jax.numpy_dtype_promotion("standard"):
            r["inf_var"] = float(np.asarray(_train_steps(name, [bad]), np.float64).ravel()[0])
            r["inf_then_clean_var"] = float(np.asarray(_train_steps(name, [bad, clean[1]]), np.float64).ravel()[0])
        out[name] = r
    return out


def run(quick: bool = False) -> dict[str, Any]:
    """Every measurement (`quick`: 2 seeds instead of 20)."""
    return {
        "offset_variance": offset_variance(2 if quick else 20),
        "batch_mode_ema": batch_mode_ema(),
        "state": state_claims(),
    }
