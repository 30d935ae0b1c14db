"""Quick start: the functional batch-norm API on a toy problem.

Shows: init_stats -> batch_norm(training=True) in a jitted step -> inference
with the running statistics. Runs in seconds on a CPU:

    python examples/quickstart.py
"""

import jax
import jax.numpy as jnp

import jaxbn


def main() -> None:
    key = jax.random.key(0)
    x = 1e4 + 3.0 * jax.random.normal(key, (256, 8))  # large offset: stable variance matters
    stats = jaxbn.init_stats(8)
    scale, bias = jnp.ones(8), jnp.zeros(8)

    @jax.jit
    def train_step(x, stats):
        y, stats = jaxbn.batch_norm(x, stats, scale, bias, training=True, momentum=0.9)
        return y, stats

    for _ in range(200):
        y, stats = train_step(x, stats)
    y_eval, _ = jaxbn.batch_norm(x, stats, scale, bias, training=False)
    print(f"train output mean {float(y.mean()):+.4f}, std {float(y.std()):.4f}")
    print(f"running mean {float(stats.mean.mean()):.2f} (true {float(x.mean()):.2f}), "
          f"running var {float(stats.var.mean()):.3f} (true {float(x.var(0).mean()):.3f})")
    print(f"eval output std {float(y_eval.std()):.4f}, updates applied: {int(stats.count)}")


if __name__ == "__main__":
    main()
