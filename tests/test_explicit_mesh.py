"""jaxbn on a mesh with Explicit axis types (the default of `jax.make_mesh` since JAX 0.9).

With Explicit axes the shardings are part of the array types and JAX refuses
(``ShardingTypeError``) an operation whose output sharding it cannot infer.
Every path a user takes with a sharded batch is run here on 8 simulated CPU
devices with ``axis_types=(AxisType.Explicit,)`` (spelled out, so every
supported JAX runs the same programs) and checked against the float64 numpy
references of tests/reference.py on the whole batch: `jax.jit` over a batch
sharded on the mesh axis (no ``axis_name``), `jax.shard_map` with
``axis_name``, and the Linen and NNX modules under `jax.jit` / `nnx.jit`.
The outputs must keep the batch's sharding and the running statistics must
come back replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests import reference as ref
from tests.conftest import require_devices

N_DEV = 8
FEATURES = 6


@pytest.fixture(scope="module")
def mesh():
    require_devices(N_DEV)  # fewer devices: a failure that says how to get them, never a skip
    return jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Explicit,))


@pytest.fixture(scope="module")
def data():
    """A batch of 32 rows with an offset (100 + N(0, 1)), so an unstable variance would show."""
    x = (100 + ref.normal(0, (4 * N_DEV, FEATURES)).astype(np.float64)).astype(np.float32)
    scale = (1.0 + 0.1 * ref.normal(1, (FEATURES,))).astype(np.float32)
    bias = (0.1 * ref.normal(2, (FEATURES,))).astype(np.float32)
    return x, scale, bias


def shard(mesh, x):
    return jax.device_put(x, NamedSharding(mesh, P("data")))


def spec_of(a) -> tuple:
    """The PartitionSpec of `a`'s type, as a tuple with trailing Nones dropped."""
    spec = tuple(jax.typeof(a).sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def close(a, b, atol):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-4, atol=atol)


def test_mesh_is_explicit(mesh):
    assert mesh.axis_types == (AxisType.Explicit,)


def test_batch_norm_under_jit_on_a_sharded_batch(mesh, data):
    x, scale, bias = data
    mask = ref.bernoulli(3, 0.7, (x.shape[0], 1))
    mean, var, n = ref.moments(x, mask=mask)

    def loss(x, scale, bias, stats, dy, mask):
        y, new = jaxbn.batch_norm(x, stats, scale, bias, training=True, momentum=0.9, mask=mask)
        return jnp.sum(y * dy), (y, new)

    dy = ref.normal(4, x.shape)
    with jax.set_mesh(mesh):
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
        (dx, dscale, dbias), (y, new) = step(shard(mesh, x), scale, bias, jaxbn.init_stats(FEATURES),
                                             shard(mesh, dy), shard(mesh, mask))
    close(y, ref.normalize(x, mean, var, scale, bias), atol=2e-4)
    want_mean, want_var, _ = ref.update(np.zeros(FEATURES), np.ones(FEATURES), 0, mean, var, n, momentum=0.9)
    close(new.mean, want_mean, atol=1e-4)
    close(new.var, want_var, atol=1e-4)
    assert int(new.count) == 1
    rdx, rdscale, rdbias = ref.bn_train_grads(x, dy, scale, mask=mask)
    close(dx, rdx, atol=2e-5)
    close(dscale, rdscale, atol=2e-5)
    close(dbias, rdbias, atol=1e-4)
    assert spec_of(y) == ("data",) and spec_of(dx) == ("data",)
    assert all(spec_of(a) == () for a in (new.mean, new.var, new.count, dscale, dbias))


def test_batch_renorm_under_jit_on_a_sharded_batch(mesh, data):
    x, scale, bias = data
    stats = jaxbn.RunningStats(jnp.full(FEATURES, 100.0, jnp.float32), jnp.full(FEATURES, 0.5, jnp.float32),
                               jnp.array(3, jnp.int32))
    with jax.set_mesh(mesh):
        y, new = jax.jit(lambda x, s: jaxbn.batch_renorm(x, s, scale, bias, training=True, r_max=2.0, d_max=1.0))(
            shard(mesh, x), stats)
    want, _, _, _ = ref.renorm_train(x, 100.0, 0.5, scale, bias, r_max=2.0, d_max=1.0)
    close(y, want, atol=5e-4)
    assert spec_of(y) == ("data",) and spec_of(new.var) == ()


def test_shard_map_with_axis_name(mesh, data):
    x, scale, bias = data

    def local(x, stats):
        return jaxbn.batch_norm(x, stats, scale, bias, training=True, axis_name="data")

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()),
                               out_specs=(P("data"), jaxbn.RunningStats(P(), P(), P()))))
    with jax.set_mesh(mesh):
        y, new = fn(shard(mesh, x), jaxbn.init_stats(FEATURES))
    mean, var, n = ref.moments(x)
    close(y, ref.normalize(x, mean, var, scale, bias), atol=2e-4)
    close(new.var, ref.update(np.zeros(FEATURES), np.ones(FEATURES), 0, mean, var, n)[1], atol=1e-4)
    assert spec_of(y) == ("data",) and spec_of(new.var) == ()


def test_linen_module_under_jit(mesh, data):
    x, _, _ = data
    bn = jaxbn.linen.BatchNorm(momentum=0.9)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    with jax.set_mesh(mesh):
        y, updates = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=False, mutable=["batch_stats"]))(
            variables, shard(mesh, x))
        y_eval = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=True))(
            {**variables, **updates}, shard(mesh, x))
    mean, var, n = ref.moments(x)
    close(y, ref.normalize(x, mean, var), atol=2e-4)
    run_mean, run_var, _ = ref.update(np.zeros(FEATURES), np.ones(FEATURES), 0, mean, var, n, momentum=0.9)
    close(updates["batch_stats"]["var"], run_var, atol=1e-4)
    close(y_eval, ref.normalize(x, run_mean, run_var), atol=5e-3)
    assert spec_of(y) == ("data",) and spec_of(y_eval) == ("data",)


def test_nnx_module_under_nnx_jit(mesh, data):
    x, _, _ = data
    model = jaxbn.nnx.BatchNorm(FEATURES, momentum=None, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
        y = nnx.jit(lambda m, x: m(x))(model, shard(mesh, x))
    mean, var, n = ref.moments(x)
    close(y, ref.normalize(x, mean, var), atol=2e-4)
    _, run_var, _ = ref.update(np.zeros(FEATURES), np.ones(FEATURES), 0, mean, var, n, momentum=None)
    close(model.var[...], run_var, atol=1e-4)
    assert spec_of(y) == ("data",)


def test_linen_ghost_batches_under_jit(mesh, data):
    x, _, _ = data
    bn = jaxbn.linen.BatchNorm(use_running_average=False, virtual_batch_size=4, momentum=0.9)
    variables = bn.init(jax.random.key(0), x)
    with jax.set_mesh(mesh):
        y, updates = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, shard(mesh, x))
    want, means, variances, counts = ref.ghost_train(x, virtual_batch_size=4)
    close(y, want, atol=2e-4)
    run = [ref.update(np.zeros(FEATURES), np.ones(FEATURES), 0, m, v, c, momentum=0.9)
           for m, v, c in zip(means, variances, counts, strict=True)]
    close(updates["batch_stats"]["var"], np.mean([r[1] for r in run], 0), atol=1e-4)
