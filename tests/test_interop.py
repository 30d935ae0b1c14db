"""jaxbn.interop: PyTorch BatchNorm semantics, state-dict interchange, kernels and momentum.

The PyTorch semantics are checked three ways: against numbers recorded from
torch 2.13 (`test_recorded_torch_numbers`), against an independent float64 numpy
implementation of torch's BatchNorm2d (`TorchBatchNorm2d`), and against torch
itself when it is installed (the `torch` tests, skipped without it).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import interop
from jaxbn.interop import fold_linen

# --- torch's BatchNorm2d, written in float64 numpy from its documented semantics ---------------------------


class TorchBatchNorm2d:
    """torch.nn.BatchNorm2d(C, eps, momentum, affine=True, track_running_stats=True), NCHW.

    Training: normalize with the batch mean and the BIASED batch variance over
    (N, H, W); then num_batches_tracked += 1 and, with f = momentum (or
    1 / num_batches_tracked when momentum is None),
    running = (1 - f) * running + f * batch, where the batch variance stored is
    the UNBIASED one (n / (n - 1)). Eval: normalize with the running stats.
    """

    def __init__(self, c, eps=1e-5, momentum=0.1, weight=None, bias=None):
        self.eps, self.momentum = eps, momentum
        self.weight = np.ones(c) if weight is None else np.asarray(weight, np.float64)
        self.bias = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
        self.running_mean, self.running_var, self.num_batches_tracked = np.zeros(c), np.ones(c), 0

    def __call__(self, x, training):
        x = np.asarray(x, np.float64)
        if training:
            n = x.size // x.shape[1]
            mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
            self.num_batches_tracked += 1
            f = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
            self.running_mean = (1 - f) * self.running_mean + f * mean
            self.running_var = (1 - f) * self.running_var + f * var * n / (n - 1)
        else:
            mean, var = self.running_mean, self.running_var
        c = (1, -1, 1, 1)
        xhat = (x - mean.reshape(c)) / np.sqrt(var.reshape(c) + self.eps)
        return xhat * self.weight.reshape(c) + self.bias.reshape(c)

    def state_dict(self):
        return {
            "weight": self.weight, "bias": self.bias, "running_mean": self.running_mean,
            "running_var": self.running_var, "num_batches_tracked": np.asarray(self.num_batches_tracked),
        }


def _batches(steps, shape=(4, 3, 5, 5), seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=shape) * (1 + i) + rng.normal(size=(1, shape[1], 1, 1)) * 3).astype(np.float32)
            for i in range(steps)]


@pytest.mark.parametrize("torch_momentum", [0.1, 0.5, None])
def test_jaxbn_reproduces_torch_training(torch_momentum):
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=3), rng.normal(size=3)
    ref = TorchBatchNorm2d(3, momentum=torch_momentum, weight=weight, bias=bias)
    stats = jaxbn.init_stats(3)
    momentum = interop.torch_momentum_to_jaxbn(torch_momentum)
    step = jax.jit(lambda x, s: jaxbn.batch_norm(
        x, s, jnp.asarray(weight, jnp.float32), jnp.asarray(bias, jnp.float32),
        training=True, axis=1, momentum=momentum, unbiased=True,
    ))
    for x in _batches(4):
        want = ref(x, training=True)
        y, stats = step(x, stats)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(stats.mean, ref.running_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.var, ref.running_var, rtol=1e-5, atol=1e-5)
        assert int(stats.count) == ref.num_batches_tracked
    # eval mode, from the converted state dict
    x = _batches(1, seed=5)[0]
    variables = interop.from_torch(ref.state_dict(), count=True)
    loaded = jaxbn.RunningStats(**variables["batch_stats"])
    np.testing.assert_allclose(loaded.mean, stats.mean, rtol=1e-5, atol=1e-6)
    assert int(loaded.count) == int(stats.count)
    y, _ = jaxbn.batch_norm(x, loaded, variables["params"]["scale"], variables["params"]["bias"],
                            training=False, axis=1)
    np.testing.assert_allclose(y, ref(x, training=False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("torch_momentum", [0.1, None])
def test_linen_module_continues_torch_training(torch_momentum):
    """A torch state dict loaded into jaxbn.linen.BatchNorm(axis=1, unbiased=True) trains on as torch does."""
    import jaxbn.linen

    ref = TorchBatchNorm2d(3, momentum=torch_momentum, weight=[1.0, 2.0, 0.5], bias=[0.0, 1.0, -1.0])
    batches = _batches(5, seed=3)
    for x in batches[:2]:
        ref(x, training=True)
    variables = interop.from_torch(ref.state_dict(), count=torch_momentum is None)
    bn = jaxbn.linen.BatchNorm(axis=1, momentum=interop.torch_momentum_to_jaxbn(torch_momentum), unbiased=True)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, jax.eval_shape(
        lambda x: bn.init(jax.random.key(0), x, use_running_average=True), batches[0]))
    step = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=False, mutable=["batch_stats"]))
    for x in batches[2:]:
        y, updates = step(variables, x)
        variables = {**variables, **updates}
        np.testing.assert_allclose(y, ref(x, training=True), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(variables["batch_stats"]["mean"], ref.running_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(variables["batch_stats"]["var"], ref.running_var, rtol=1e-5, atol=1e-5)
    sd = interop.to_torch(variables)
    assert int(sd["num_batches_tracked"]) == (5 if torch_momentum is None else 0)
    np.testing.assert_allclose(sd["running_var"], ref.running_var, rtol=1e-5)


def test_recorded_torch_numbers():
    """Numbers recorded from torch 2.13's BatchNorm2d(2) (momentum 0.1), two train steps then eval."""
    x = (np.arange(24, dtype=np.float32).reshape(2, 2, 3, 2) ** 1.5 / 10).astype(np.float32)
    scale, bias = jnp.array([0.5, 2.0]), jnp.array([1.0, -1.0])
    kw = dict(axis=1, momentum=interop.torch_momentum_to_jaxbn(0.1), unbiased=True)
    stats = jaxbn.init_stats(2)
    y1, stats = jaxbn.batch_norm(x, stats, scale, bias, training=True, **kw)
    y2, stats = jaxbn.batch_norm(x * 2 - 1, stats, scale, bias, training=True, **kw)
    y3, _ = jaxbn.batch_norm(x, stats, scale, bias, training=False, **kw)
    np.testing.assert_allclose(stats.mean, [0.77294123, 1.6141586], rtol=1e-6)
    np.testing.assert_allclose(stats.var, [4.5539804, 7.4791837], rtol=1e-6)
    np.testing.assert_allclose(y1[0, :, 0, 0], [0.43130133, -3.5146983], rtol=1e-5)
    np.testing.assert_allclose(y2[1, :, 2, 1], [1.7555475, 1.8987799], rtol=1e-5)
    np.testing.assert_allclose(y3[1, :, 1, 0], [2.0462422, 4.3605986], rtol=1e-5)
    sd = interop.to_torch({"params": {"scale": scale, "bias": bias}, "batch_stats": stats._asdict()})
    assert int(sd["num_batches_tracked"]) == 2 and sd["num_batches_tracked"].dtype == np.int64


# --- state dicts -------------------------------------------------------------------------------------------


def _state(c=4, seed=0, affine=True):
    rng = np.random.default_rng(seed)
    sd = {"running_mean": rng.normal(size=c), "running_var": rng.uniform(0.5, 2, c)}
    sd["num_batches_tracked"] = np.array(3)
    if affine:
        sd.update(weight=rng.normal(size=c), bias=rng.normal(size=c))
    return sd


def test_from_torch_to_torch_round_trip():
    sd = _state()
    v = interop.from_torch(sd)
    assert set(v) == {"params", "batch_stats"}
    assert set(v["params"]) == {"scale", "bias"} and set(v["batch_stats"]) == {"mean", "var"}
    assert all(a.dtype == jnp.float32 and a.shape == (4,) for a in jax.tree.leaves(v))
    back = interop.to_torch(v, num_batches_tracked=3)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_allclose(back[k], sd[k], rtol=1e-6)
    assert back["weight"].dtype == np.float32 and back["num_batches_tracked"].dtype == np.int64


def test_variables_load_into_flax_batch_norm():
    sd = _state(seed=1)
    x = np.random.default_rng(2).normal(size=(3, 4, 4, 4)).astype(np.float32)  # NCHW
    v = interop.from_torch(sd)
    y = nn.BatchNorm(use_running_average=True, axis=1).apply(v, x)
    ref = TorchBatchNorm2d(4, weight=sd["weight"], bias=sd["bias"])
    ref.running_mean, ref.running_var = sd["running_mean"], sd["running_var"]
    np.testing.assert_allclose(y, ref(x, training=False), rtol=1e-5, atol=1e-5)


def test_affine_false():
    sd = _state(affine=False)
    v = interop.from_torch(sd)
    assert set(v) == {"batch_stats"}
    x = np.random.default_rng(5).normal(size=(2, 3, 4)).astype(np.float32)
    y = nn.BatchNorm(use_running_average=True, use_scale=False, use_bias=False).apply(v, x)
    # no affine: (x - running_mean) / sqrt(running_var + eps), float64
    want = (x.astype(np.float64) - sd["running_mean"]) / np.sqrt(np.asarray(sd["running_var"], np.float64) + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    back = interop.to_torch(v)
    assert set(back) == {"running_mean", "running_var", "num_batches_tracked"}


def test_from_torch_copies_the_callers_buffers():
    """`{k: t.numpy()}` shares memory with the tensors: one more PyTorch step must not change the
    arrays from_torch returned (it moved the running mean 0.003 -> 0.498 before they were copied)."""
    torch_bn = TorchBatchNorm2d(3)
    torch_bn(_batches(1)[0], training=True)
    buffers = {k: np.asarray(v, np.float32) for k, v in torch_bn.state_dict().items()}  # the caller's views
    buffers["num_batches_tracked"] = np.asarray(torch_bn.num_batches_tracked, np.int64)
    before = {k: v.copy() for k, v in buffers.items()}
    v = interop.from_torch(buffers, count=True)
    for k in buffers:  # the caller's buffers change in place, as a PyTorch step does
        buffers[k][...] = buffers[k] + 7
    np.testing.assert_array_equal(v["batch_stats"]["mean"], before["running_mean"])
    np.testing.assert_array_equal(v["batch_stats"]["var"], before["running_var"])
    np.testing.assert_array_equal(v["params"]["scale"], before["weight"])
    np.testing.assert_array_equal(v["params"]["bias"], before["bias"])
    assert int(v["batch_stats"]["count"]) == int(before["num_batches_tracked"])


def test_lone_scale_or_bias_is_completed_for_affine_true():
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    sd = interop.to_torch({"params": {"scale": jnp.full(3, 2.0)}, "batch_stats": stats})
    np.testing.assert_array_equal(sd["weight"], [2, 2, 2])
    np.testing.assert_array_equal(sd["bias"], [0, 0, 0])
    sd = interop.to_torch({"params": {"bias": jnp.full(3, 2.0)}, "batch_stats": stats})
    np.testing.assert_array_equal(sd["weight"], [1, 1, 1])
    assert set(interop.from_torch({"bias": np.ones(3), "running_mean": np.zeros(3), "running_var": np.ones(3)})[
        "params"]) == {"bias"}


def test_prefix_and_count():
    sd = {f"layer1.bn.{k}": v for k, v in _state().items()}
    sd["layer1.conv.weight"] = np.zeros((4, 4, 3, 3))
    v = interop.from_torch(sd, prefix="layer1.bn", count=True)
    assert int(v["batch_stats"]["count"]) == 3 and v["batch_stats"]["count"].dtype == jnp.int32
    assert int(interop.to_torch(v)["num_batches_tracked"]) == 3
    v2 = interop.from_torch(sd, prefix="layer1.bn.", dtype=jnp.bfloat16)
    assert v2["params"]["scale"].dtype == jnp.bfloat16


class FakeTensor:
    """Quacks like a torch tensor on an accelerator: np.asarray only after .detach().cpu()."""

    def __init__(self, value):
        self.value, self.dtype, self.on_cpu, self.detached = np.asarray(value), "torch.float32", False, False

    def detach(self):
        out = FakeTensor(self.value)
        out.on_cpu, out.detached = self.on_cpu, True
        return out

    def cpu(self):
        out = FakeTensor(self.value)
        out.on_cpu, out.detached = True, self.detached
        return out

    def __array__(self, dtype=None, copy=None):
        if not (self.on_cpu and self.detached):
            raise TypeError("can't convert a CUDA tensor that requires grad to numpy")
        return self.value if dtype is None else self.value.astype(dtype)


def test_tensor_like_values_are_detached_and_moved():
    sd = {k: FakeTensor(v) for k, v in _state().items()}
    v = interop.from_torch(sd)
    np.testing.assert_allclose(v["batch_stats"]["mean"], _state()["running_mean"], rtol=1e-6)


@pytest.mark.parametrize(
    "state, kw, match",
    [
        ({**_state(), "conv.weight": np.ones((4, 4))}, {}, r"keys \['conv\.weight'\] that a PyTorch.*prefix="),
        ({"weight": np.ones(4), "bias": np.ones(4)}, {}, r"no running_mean/running_var.*track_running_stats=False"),
        ({**_state(), "running_var": np.ones(5)}, {}, r"one shape \(channels,\), got shapes .*'running_var': \(5,\)"),
        ({"running_mean": np.ones((2, 2)), "running_var": np.ones((2, 2))}, {}, r"one shape \(channels,\)"),
        ({"x.running_mean": np.ones(2)}, {"prefix": "y"}, r"under prefix 'y' has no running_mean"),
    ],
)
def test_from_torch_value_errors(state, kw, match):
    with pytest.raises(ValueError, match=match):
        interop.from_torch(state, **kw)


def test_from_torch_type_errors():
    with pytest.raises(TypeError, match=r"running_mean must be a floating-point array, got dtype int64"):
        interop.from_torch({"running_mean": np.zeros(2, np.int64), "running_var": np.ones(2)})
    with pytest.raises(TypeError, match=r"state must be a mapping"):
        interop.from_torch([1, 2])


def test_to_torch_errors():
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"batch_stats/mean and batch_stats/var.*collections \['params'\]"):
        interop.to_torch({"params": {"scale": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"one shape \(channels,\).*'weight': \(4,\)"):
        interop.to_torch({"params": {"scale": jnp.ones(4)}, "batch_stats": stats})
    with pytest.raises(ValueError, match=r"one channel axis"):
        interop.to_torch({"batch_stats": {"mean": jnp.zeros((2, 3)), "var": jnp.ones((2, 3))}})
    with pytest.raises(TypeError, match=r"running_mean is complex"):
        interop.to_torch({"batch_stats": {"mean": jnp.zeros(3, jnp.complex64), "var": jnp.ones(3)}})


# --- momentum, kernels, whole models ------------------------------------------------------------------------


def test_momentum_conversion():
    assert interop.torch_momentum_to_jaxbn(0.1) == pytest.approx(0.9)
    assert interop.jaxbn_momentum_to_torch(0.9) == pytest.approx(0.1)
    assert interop.torch_momentum_to_jaxbn(None) is None and interop.jaxbn_momentum_to_torch(None) is None
    for m in (0.0, 0.01, 0.3, 1.0):
        assert interop.jaxbn_momentum_to_torch(interop.torch_momentum_to_jaxbn(m)) == pytest.approx(m)
    with pytest.raises(ValueError, match=r"momentum=1.5 is outside \[0, 1\]"):
        interop.torch_momentum_to_jaxbn(1.5)
    with pytest.raises(TypeError, match=r"momentum must be a float"):
        interop.jaxbn_momentum_to_torch("0.1")


def test_kernel_layouts():
    w = np.random.default_rng(0).normal(size=(8, 2, 3, 5))  # torch Conv2d (out, in/groups, kh, kw)
    k = interop.kernel_from_torch(w)
    assert k.shape == (3, 5, 2, 8)
    np.testing.assert_array_equal(k[1, 4, 0, 7], w[7, 0, 1, 4])
    np.testing.assert_array_equal(interop.kernel_to_torch(k), w)
    assert interop.kernel_from_torch(np.zeros((4, 3))).shape == (3, 4)  # Linear
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*shape \(4,\)"):
        interop.kernel_from_torch(np.zeros(4))
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*shape \(4,\)"):
        interop.kernel_to_torch(np.zeros(4))


def test_model_round_trip_and_errors():
    rng = np.random.default_rng(3)
    sd = {"conv.weight": rng.normal(size=(4, 3, 3, 3)), "fc.weight": rng.normal(size=(2, 4)), "fc.bias": np.ones(2)}
    sd.update({f"bn.{k}": v for k, v in _state().items()})
    mapping = {"conv": "Conv_0", "bn": "block/BatchNorm_0", "fc": ("Dense_0",)}
    v = interop.from_torch_model(sd, mapping, count=True)
    assert v["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 4) and "bias" not in v["params"]["Conv_0"]
    assert set(v["batch_stats"]["block"]["BatchNorm_0"]) == {"mean", "var", "count"}
    back = interop.to_torch_model(v, mapping)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_allclose(back[k], sd[k], rtol=1e-6, err_msg=k)
    with pytest.raises(ValueError, match=r"no key of state_dict starts with 'bn2\.'"):
        interop.from_torch_model(sd, {"bn2": "x"})
    with pytest.raises(ValueError, match=r"module 'fc' has keys \['bias'\] and is neither"):
        interop.from_torch_model({"fc.bias": np.ones(2)}, {"fc": "x"})
    with pytest.raises(ValueError, match=r"flax module 'nope' has neither"):
        interop.to_torch_model(v, {"x": "nope"})


# --- against torch itself -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("torch_momentum", [0.1, None])
def test_torch_train_eval_and_grads(torch, torch_momentum):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, momentum=torch_momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -1.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    v = interop.from_torch(bn.state_dict())
    scale, bias = v["params"]["scale"], v["params"]["bias"]
    stats = jaxbn.init_stats(3)
    kw = dict(axis=1, momentum=interop.torch_momentum_to_jaxbn(torch_momentum), unbiased=True)

    def loss(x, scale, bias, stats, g):
        y, new = jaxbn.batch_norm(x, stats, scale, bias, training=True, **kw)
        return jnp.sum(y * g), (y, new)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    bn.train()
    for i, x in enumerate(_batches(4, seed=7)):
        g = np.random.default_rng(i).normal(size=x.shape).astype(np.float32)
        xt = torch.tensor(x, requires_grad=True)
        bn.zero_grad()
        yt = bn(xt)
        (yt * torch.tensor(g)).sum().backward()
        (dx, dscale, dbias), (y, stats) = grad(jnp.asarray(x), scale, bias, stats, jnp.asarray(g))
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(dscale, bn.weight.grad.numpy(), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(dbias, bn.bias.grad.numpy(), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(stats.mean, bn.running_mean.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.var, bn.running_var.numpy(), rtol=1e-5, atol=1e-5)
    bn.eval()
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        want = bn(torch.tensor(x)).numpy()
    y, _ = jaxbn.batch_norm(x, stats, scale, bias, training=False, **kw)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # the state dict of the trained module gives the same eval outputs, and round-trips into torch
    v = interop.from_torch(bn.state_dict(), count=True)
    assert int(v["batch_stats"]["count"]) == int(stats.count) == 4
    y2 = nn.BatchNorm(use_running_average=True, axis=1).apply(
        {"params": v["params"], "batch_stats": {k: v["batch_stats"][k] for k in ("mean", "var")}}, x
    )
    np.testing.assert_allclose(y2, want, rtol=1e-5, atol=1e-5)
    fresh = torch.nn.BatchNorm2d(3).eval()
    sd = interop.to_torch({"params": {"scale": scale, "bias": bias}, "batch_stats": stats._asdict()})
    fresh.load_state_dict({k: torch.from_numpy(a) for k, a in sd.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.tensor(x)).numpy(), want, rtol=1e-5, atol=1e-5)
    assert int(fresh.num_batches_tracked) == 4


class FlaxNet(nn.Module):
    """NHWC twin of TorchNet below (explicit padding to match torch's)."""

    folded: bool = False

    @nn.compact
    def __call__(self, x):
        def bn(x):
            return x if self.folded else nn.BatchNorm(use_running_average=True, use_fast_variance=False)(x)

        x = nn.relu(bn(nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=self.folded)(x)))
        x = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=2, use_bias=self.folded)(x)
        x = nn.relu(bn(x))
        x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=8, use_bias=True)(x)  # depthwise
        x = nn.relu(bn(x))
        return nn.Dense(5)(x.mean(axis=(1, 2)))


def test_torch_model_port_and_fold(torch):
    tnn = torch.nn

    class TorchNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = tnn.Conv2d(3, 8, 3, padding=1, bias=False), tnn.BatchNorm2d(8)
            self.conv2, self.bn2 = tnn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), tnn.BatchNorm2d(8)
            self.conv3, self.bn3 = tnn.Conv2d(8, 8, 3, padding=1, groups=8), tnn.BatchNorm2d(8)
            self.fc = tnn.Linear(8, 5)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            x = torch.relu(self.bn3(self.conv3(x)))
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = TorchNet()
    net.train()
    with torch.no_grad():
        for x in _batches(3, shape=(4, 3, 8, 8), seed=11):
            net(torch.tensor(x))  # non-trivial running statistics
    net.eval()
    x = _batches(1, shape=(2, 3, 8, 8), seed=12)[0]
    with torch.no_grad():
        want = net(torch.tensor(x)).numpy()
    mapping = {"conv1": "Conv_0", "bn1": "BatchNorm_0", "conv2": "Conv_1", "bn2": "BatchNorm_1",
               "conv3": "Conv_2", "bn3": "BatchNorm_2", "fc": "Dense_0"}
    variables = interop.from_torch_model(net.state_dict(), mapping)
    x_nhwc = np.transpose(x, (0, 2, 3, 1))
    y = FlaxNet().apply(variables, x_nhwc)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    folded = fold_linen(variables, [(f"Conv_{i}", f"BatchNorm_{i}") for i in range(3)])
    np.testing.assert_allclose(FlaxNet(folded=True).apply(folded, x_nhwc), want, rtol=1e-4, atol=1e-4)
    # and back: the flax variables load into the torch model
    fresh = TorchNet().eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in interop.to_torch_model(variables, mapping).items()})
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.tensor(x)).numpy(), want, rtol=1e-5, atol=1e-5)
