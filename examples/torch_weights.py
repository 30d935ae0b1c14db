"""Loading PyTorch BatchNorm weights into jaxbn / Flax, and checking the outputs match.

A PyTorch model ``conv1 (Conv2d 1->8, 3x3, no bias) -> bn1 (BatchNorm2d) ->
relu -> global average pool -> fc (Linear 8->10)`` is given as its
``state_dict()`` of numpy arrays (the form a checkpoint takes once loaded with
``torch.load`` and converted, or ``np.load`` of an ``.npz``). The example

* converts the batch norm with ``jaxbn.interop.from_torch(state, prefix="bn1")``
  (``weight/bias/running_mean/running_var`` -> ``params/{scale,bias}``,
  ``batch_stats/{mean,var}``) and the conv and linear kernels with
  ``jaxbn.interop.kernel_from_torch`` (OIHW -> HWIO, (out, in) -> (in, out));
* runs the same network in Flax with `jaxbn.linen.BatchNorm` on NHWC input,
  and with the functional `jaxbn.batch_norm(..., axis=1)` on NCHW input;
* compares both with PyTorch's inference output: PyTorch itself when it is
  installed (the state dict then comes from a real ``torch.nn`` model that ran
  a few training steps), otherwise a numpy re-implementation of PyTorch's
  inference maths (torch is optional: jaxbn never imports it).

It also prints the momentum conversion (PyTorch's ``momentum=0.1`` is jaxbn's 0.9).

Run::

    python examples/torch_weights.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
import jaxbn.interop
import jaxbn.linen

try:  # optional: only used to produce a real state dict and a reference output
    import torch
except ImportError:
    torch = None

C_OUT = 8
EPS = 1e-5


def torch_state_dict_and_reference(x_nchw: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """A PyTorch-layout state dict (numpy) and PyTorch's eval-mode logits for `x_nchw`."""
    if torch is not None:
        torch.manual_seed(0)
        net = torch.nn.Sequential()
        net.add_module("conv1", torch.nn.Conv2d(1, C_OUT, 3, padding=1, bias=False))
        net.add_module("bn1", torch.nn.BatchNorm2d(C_OUT, eps=EPS, momentum=0.1))
        net.add_module("relu", torch.nn.ReLU())
        net.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
        net.add_module("flatten", torch.nn.Flatten())
        net.add_module("fc", torch.nn.Linear(C_OUT, 10))
        net.train()
        with torch.no_grad():
            for _ in range(5):  # a few training-mode passes: running stats move away from (0, 1)
                net(torch.randn(16, 1, 8, 8) * 3 + 1)
            net.bn1.weight.uniform_(0.5, 1.5)
            net.bn1.bias.uniform_(-0.5, 0.5)
        net.eval()
        with torch.no_grad():
            ref = net(torch.from_numpy(x_nchw)).numpy()
        return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}, ref, f"torch {torch.__version__}"

    rng = np.random.default_rng(0)
    sd = {
        "conv1.weight": rng.normal(0, 0.5, (C_OUT, 1, 3, 3)).astype(np.float32),  # OIHW
        "bn1.weight": rng.uniform(0.5, 1.5, C_OUT).astype(np.float32),
        "bn1.bias": rng.uniform(-0.5, 0.5, C_OUT).astype(np.float32),
        "bn1.running_mean": rng.normal(0, 1, C_OUT).astype(np.float32),
        "bn1.running_var": rng.uniform(0.5, 4.0, C_OUT).astype(np.float32),
        "bn1.num_batches_tracked": np.array(5, np.int64),
        "fc.weight": rng.normal(0, 0.3, (10, C_OUT)).astype(np.float32),  # (out, in)
        "fc.bias": rng.normal(0, 0.1, 10).astype(np.float32),
    }
    # PyTorch's eval-mode forward, in float64 numpy: conv (padding 1), BN with running stats, relu, pool, fc.
    n, _, h, w = x_nchw.shape
    xp = np.pad(x_nchw.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.stack([xp[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)  # N, 1, H, W, 9
    z = np.einsum("nchwk,ock->nohw", patches, sd["conv1.weight"].reshape(C_OUT, 1, 9))
    bc = lambda v: v[None, :, None, None]  # noqa: E731
    z = (z - bc(sd["bn1.running_mean"])) / np.sqrt(bc(sd["bn1.running_var"]) + EPS)
    z = np.maximum(z * bc(sd["bn1.weight"]) + bc(sd["bn1.bias"]), 0).mean(axis=(2, 3))
    return sd, z @ sd["fc.weight"].T + sd["fc.bias"], "a numpy re-implementation (torch is not installed)"


class Net(nn.Module):
    """The same network in Flax, NHWC."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(C_OUT, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
        x = jaxbn.linen.BatchNorm(use_running_average=True, epsilon=EPS)(x)
        x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def main() -> None:
    from sklearn.datasets import load_digits

    x_nchw = (load_digits().images[:64] / 16.0).astype(np.float32)[:, None]  # (64, 1, 8, 8), PyTorch layout
    sd, ref, source = torch_state_dict_and_reference(x_nchw)
    print(f"PyTorch state dict keys: {sorted(sd)}")

    bn = jaxbn.interop.from_torch(sd, prefix="bn1")  # {'params': {scale, bias}, 'batch_stats': {mean, var}}
    variables = {
        "params": {
            "Conv_0": {"kernel": jnp.asarray(jaxbn.interop.kernel_from_torch(sd["conv1.weight"]))},  # OIHW -> HWIO
            "BatchNorm_0": bn["params"],
            "Dense_0": {"kernel": jnp.asarray(jaxbn.interop.kernel_from_torch(sd["fc.weight"])),
                        "bias": jnp.asarray(sd["fc.bias"])},
        },
        "batch_stats": {"BatchNorm_0": bn["batch_stats"]},
    }
    logits_linen = Net().apply(variables, jnp.asarray(x_nchw).transpose(0, 2, 3, 1))  # NCHW -> NHWC

    # The functional API on NCHW directly: the channel axis is 1.
    conv = jax.lax.conv_general_dilated(jnp.asarray(x_nchw), jnp.asarray(sd["conv1.weight"]), (1, 1),
                                        ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    stats = jaxbn.RunningStats(bn["batch_stats"]["mean"], bn["batch_stats"]["var"], jnp.asarray(5, jnp.int32))
    z, _ = jaxbn.batch_norm(conv, stats, bn["params"]["scale"], bn["params"]["bias"], training=False, axis=1,
                            epsilon=EPS)
    logits_fn = jax.nn.relu(z).mean(axis=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]

    err_linen = float(np.max(np.abs(np.asarray(logits_linen) - ref)))
    err_fn = float(np.max(np.abs(np.asarray(logits_fn) - ref)))
    print(f"reference output from {source}")
    print(f"jaxbn.linen.BatchNorm (NHWC, axis=-1):    max |logits - PyTorch| = {err_linen:.2e}")
    print(f"jaxbn.batch_norm (NCHW, axis=1):          max |logits - PyTorch| = {err_fn:.2e}")
    print(f"PyTorch momentum 0.1 -> jaxbn momentum {jaxbn.interop.torch_momentum_to_jaxbn(0.1):.1f}")
    assert err_linen < 1e-4 and err_fn < 1e-4

    back = jaxbn.interop.to_torch({c: v["BatchNorm_0"] for c, v in variables.items()}, num_batches_tracked=5)
    assert all(np.allclose(back[k], sd[f"bn1.{k}"]) for k in back)
    print(f"round trip jaxbn.interop.to_torch: {sorted(back)} equal to the original")


if __name__ == "__main__":
    main()
