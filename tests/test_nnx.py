"""jaxbn.nnx.BatchNorm: a drop-in for flax.nnx.BatchNorm, plus its extras."""

import doctest
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn.nnx
from tests import reference as ref
from tests.reference import bernoulli as _bernoulli
from tests.reference import normal as _normal

BN = jaxbn.nnx.BatchNorm
F32 = dict(rtol=2e-5, atol=2e-5)



def _flax_promotion():
    """flax's own BatchNorm promotes implicitly: run the reference under standard promotion (ours runs strict)."""
    return jax.numpy_dtype_promotion("standard")


def _close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **(kw or F32)), a, b)


def _pair(n, **kw):
    """(flax's layer with use_fast_variance=False, ours), same parameters."""
    theirs = nnx.BatchNorm(n, use_fast_variance=False, rngs=nnx.Rngs(0), **kw)
    ours = BN(n, rngs=nnx.Rngs(0), **kw)
    return theirs, ours


def _set_params(layer, key):
    layer.scale[...] = jnp.asarray(1.0 + _normal(key, layer.scale.shape))
    layer.bias[...] = jnp.asarray(_normal(key + 1, layer.bias.shape))


# ---------------------------------------------------------------- drop-in surface


def test_constructor_accepts_every_flax_argument_with_flax_defaults():
    ours = inspect.signature(BN.__init__).parameters
    theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
    for name, p in theirs.items():
        assert name in ours, name
        assert ours[name].kind == p.kind, name
        if name not in ("bias_init", "scale_init"):  # fresh closures, compared by behaviour below
            assert ours[name].default == p.default, name
    extras = [n for n in ours if n not in theirs]
    assert extras == ["renorm", "renorm_r_max", "renorm_d_max", "virtual_batch_size", "unbiased", "strategy"]
    assert [ours[n].default for n in extras] == [False, 3.0, 5.0, None, False, "auto"]
    theirs_l, ours_l = _pair(3)
    _close(nnx.state(ours_l), nnx.state(theirs_l), rtol=0, atol=0)
    assert jax.tree.structure(nnx.state(ours_l)) == jax.tree.structure(nnx.state(theirs_l))


def test_graph_does_not_depend_on_initializers():
    a = BN(3, rngs=nnx.Rngs(0))
    b = BN(3, scale_init=nnx.initializers.constant(2.0), bias_init=lambda k, s, d: jnp.full(s, 0.5, d),
           rngs=nnx.Rngs(1))
    assert nnx.graphdef(a) == nnx.graphdef(b)
    assert float(b.scale[0]) == 2.0 and float(b.bias[0]) == 0.5


def test_metadata_and_no_scale_bias():
    bn = BN(3, rngs=nnx.Rngs(0), scale_metadata={"note": "feat"}, bias_metadata={"tag": "b"})
    assert bn.scale.get_metadata()["note"] == "feat"
    assert bn.bias.get_metadata()["tag"] == "b"
    bare = BN(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    ref_bare = nnx.BatchNorm(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    assert bare.scale is None and bare.bias is None
    assert jax.tree.structure(nnx.state(bare)) == jax.tree.structure(nnx.state(ref_bare))


@pytest.mark.parametrize("doc_of", [nnx.BatchNorm, nnx.view, nnx.view_info], ids=lambda f: f.__name__)
def test_flax_docstring_examples_run_on_ours(doc_of):
    """flax's own BatchNorm examples, with nnx.BatchNorm swapped for ours, give flax's printed results."""
    doc = doc_of.__doc__.replace("nnx.BatchNorm(", "jaxbn.nnx.BatchNorm(")
    assert "jaxbn.nnx.BatchNorm(" in doc
    test = doctest.DocTestParser().get_doctest(doc, {"jaxbn": jaxbn}, doc_of.__name__, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False) == (0, len(test.examples))


# ---------------------------------------------------------------- parity with flax

CASES = [((16, 5), -1, False), ((16, 5), -1, True), ((4, 3, 3, 5), -1, True), ((4, 5, 3, 3), 1, True)]


@pytest.mark.parametrize("shape, axis, masked", CASES, ids=["NC", "NC-mask", "NHWC-mask", "NCHW-mask"])
def test_matches_flax(shape, axis, masked):
    kp = 7
    x = 2.0 + 3.0 * _normal(0, shape)
    mask = _bernoulli(1, 0.7, shape) if masked else None
    theirs, ours = _pair(shape[axis], axis=axis, momentum=0.9)
    for layer in (theirs, ours):
        _set_params(layer, kp)

    @nnx.jit
    def step(layer, x):
        def loss(layer, x):
            y = layer(x, mask=mask)
            return jnp.sum(jnp.sin(y) * y), y

        (_, y), (g, gx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
        return y, nnx.state(g, nnx.Param), gx

    yt, gt, gxt = step(theirs, x)
    yo, go, gxo = step(ours, x)
    _close(yo, yt)
    _close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))
    _close((go, gxo), (gt, gxt), rtol=1e-4, atol=1e-4)
    theirs.eval()
    ours.eval()
    _close(ours(x), theirs(x))


def test_train_eval_view_and_call_override():
    x = _normal(0, (8, 3)) + 1.0
    bn = BN(3, momentum=0.5, rngs=nnx.Rngs(0))
    bn.eval()
    y = bn(x)
    _close(y, ref.normalize(x, np.zeros(3), np.ones(3)))
    _close(bn.mean[...], jnp.zeros(3), rtol=0, atol=0)
    train_view = nnx.view(bn, use_running_average=False)
    assert train_view.use_running_average is False and bn.use_running_average is True
    train_view(x)  # shares the arrays: the original's stats move
    _close(bn.mean[...], 0.5 * x.mean(0))
    bn(x, use_running_average=False)
    _close(bn.mean[...], 0.75 * x.mean(0))
    bn.train()
    assert bn.use_running_average is False
    assert "use_running_average" in nnx.view_info(bn)
    with pytest.raises(ValueError, match="No `use_running_average` argument"):
        BN(3, use_running_average=None, rngs=nnx.Rngs(0))(x)


def test_promote_dtype_is_honoured():
    x = _normal(0, (8, 4)).astype(jnp.bfloat16)
    for dtype in [None, jnp.bfloat16, jnp.float32]:
        theirs, ours = _pair(4, dtype=dtype)
        with _flax_promotion():
            yt = theirs(x)
        yo = ours(x)
        assert yo.dtype == yt.dtype
        _close(yo.astype(jnp.float32), yt.astype(jnp.float32), rtol=2e-2, atol=2e-2)
        _close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat), rtol=1e-3, atol=1e-3)
    calls = []

    def promote(args, *, dtype=None):
        calls.append(dtype)
        return tuple(None if a is None else jnp.asarray(a, jnp.float16) for a in args)

    bn = BN(4, promote_dtype=promote, dtype=jnp.float16, rngs=nnx.Rngs(0))
    assert bn(x).dtype == jnp.float16 and calls == [jnp.float16]


def test_complex_keeps_complex_running_mean_and_one_value_per_feature():
    x = _normal(0, (6, 2), np.complex64)
    bn = BN(2, momentum=0.9, dtype=jnp.complex64, rngs=nnx.Rngs(0))
    y = bn(x)
    assert y.dtype == jnp.complex64 and bn.mean[...].dtype == jnp.complex64
    _close(bn.mean[...], 0.1 * x.mean(0), atol=1e-5)
    _close(bn.var[...], 0.9 + 0.1 * x.var(0), rtol=1e-5)
    bn = BN(3, momentum=0.5, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(bn(jnp.full((1, 3), 4.0)), jnp.zeros((1, 3)))
    _close(bn.mean[...], jnp.full(3, 2.0))
    _close(bn.var[...], jnp.full(3, 0.5))


def test_jit_split_merge_and_optimizer_step_match_flax():
    class CNN(nnx.Module):
        def __init__(self, norm, rngs):
            self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
            self.bn1 = norm(4, momentum=0.9, rngs=rngs)
            self.lin = nnx.Linear(4, 6, rngs=rngs)
            self.bn2 = norm(6, momentum=0.9, rngs=rngs)
            self.out = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn1(self.conv(x))).mean((1, 2))
            return self.out(nnx.relu(self.bn2(self.lin(x))))

    xs = _normal(0, (4, 8, 6, 6, 2))
    ys = np.random.default_rng(1).integers(0, 3, (4, 8))
    results = []
    start = nnx.state(CNN(BN, nnx.Rngs(1)))  # initialized once: the same start for both
    for norm in [lambda n, **kw: nnx.BatchNorm(n, use_fast_variance=False, **kw), BN]:
        model = nnx.eval_shape(lambda norm=norm: CNN(norm, nnx.Rngs(1)))
        nnx.update(model, start)
        opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt, x, y):
            def loss_fn(model):
                return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

            loss, g = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, g)
            return loss

        losses = [step(model, opt, x, y) for x, y in zip(xs, ys, strict=True)]
        # split / merge round trip, then eval
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, state)
        model.eval()
        results.append((np.array(losses), nnx.state(model, nnx.BatchStat), nnx.jit(lambda m, x: m(x))(model, xs[0])))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-4)
    _close(results[1][1:], results[0][1:], rtol=1e-4, atol=1e-4)


def test_state_interchange_with_flax():
    x = _normal(0, (8, 3)) * 2 + 1
    theirs, ours = _pair(3, momentum=0.5)
    theirs(x)
    nnx.update(ours, nnx.state(theirs))
    ours.eval()
    theirs.eval()
    _close(ours(x), theirs(x))
    ours.train()
    ours(2 * x)
    nnx.update(theirs, nnx.state(ours))
    _close(nnx.state(theirs), nnx.state(ours), rtol=0, atol=0)


# ---------------------------------------------------------------- extras


def test_extras_match_reference():
    x = 1.0 + 2.0 * _normal(3, (12, 3))
    # renorm
    bn = BN(3, renorm=True, renorm_r_max=2.0, renorm_d_max=1.0, momentum=0.8, rngs=nnx.Rngs(0))
    run_mean, run_var = jnp.array([0.5, -8.0, 0.0]), jnp.array([0.2, 1.0, 30.0])
    bn.mean[...], bn.var[...] = run_mean, run_var
    y = bn(x)
    y_ref, m, v, n = ref.renorm_train(x, run_mean, run_var, r_max=2.0, d_max=1.0)
    _close(y, y_ref)
    mean_ref, var_ref, _ = ref.update(run_mean, run_var, 0, m, v, n, momentum=0.8)
    _close((bn.mean[...], bn.var[...]), (mean_ref, var_ref))
    # ghost batches
    bn = BN(3, virtual_batch_size=4, momentum=0.0, rngs=nnx.Rngs(0))
    y_ref, means, variances, _ = ref.ghost_train(x, virtual_batch_size=4)
    _close(bn(x), y_ref, rtol=1e-4, atol=1e-4)
    _close((bn.mean[...], bn.var[...]), (means.mean(0), variances.mean(0)))
    # padding that fills whole ghost batches: the update of the batch without it
    for momentum in (0.5, None):
        padded = BN(3, virtual_batch_size=4, momentum=momentum, rngs=nnx.Rngs(0))
        xp = np.concatenate([x[:8] * 10 + 50, np.full((4, 3), 1e3, np.float32)])
        padded(xp, mask=np.arange(12)[:, None] < 8)
        mean, var, count = ref.ghost_stats(xp[:8], 4, momentum=momentum)
        _close((padded.mean[...], padded.var[...]), (mean, var))
    bn.eval()
    assert bn(x[:5]).shape == (5, 3)  # inference: any batch size
    bn.train()
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide the batch size"):
        bn(x[:5])
    with pytest.raises(ValueError, match="virtual_batch_size must be None or an int >= 1"):
        BN(3, virtual_batch_size=-2, rngs=nnx.Rngs(0))
    # unbiased + cumulative average
    bn = BN(3, momentum=None, unbiased=True, rngs=nnx.Rngs(0))
    assert set(nnx.state(bn, nnx.BatchStat)) == {"mean", "var", "count"}
    assert "count" not in nnx.state(BN(3, rngs=nnx.Rngs(0)), nnx.BatchStat)
    bn(x[:6])
    bn(x[6:] * 3)
    assert int(bn.count[...]) == 2
    _close(bn.mean[...], (x[:6].mean(0) + 3 * x[6:].mean(0)) / 2)
    _close(bn.var[...], (np.var(x[:6], 0, ddof=1) + np.var(3 * x[6:], 0, ddof=1)) / 2, rtol=1e-5)


def test_axis_name_under_nnx_vmap_matches_flax():
    x = 1.0 + 2.0 * _normal(5, (4, 4, 3))
    outs = []
    for layer in _pair(3, axis_name="b", momentum=0.0):

        @nnx.vmap(in_axes=(None, 0), out_axes=0, axis_name="b")
        def fwd(m, x):
            return m(x)

        outs.append((fwd(layer, x), nnx.state(layer, nnx.BatchStat)))
    _close(outs[1], outs[0])
    flat = np.asarray(x).reshape(-1, 3)
    _close((outs[1][1]["mean"][...], outs[1][1]["var"][...]), (flat.mean(0), flat.var(0)))


def test_orbax_round_trip_into_flax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    x = _normal(0, (8, 3)) * 2 + 1
    ours = BN(3, momentum=0.5, rngs=nnx.Rngs(0))
    ours(x)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", nnx.state(ours))
        ckptr.wait_until_finished()
        theirs = nnx.eval_shape(lambda: nnx.BatchNorm(3, rngs=nnx.Rngs(1)))
        graphdef, abstract = nnx.split(theirs)
        theirs = nnx.merge(graphdef, ckptr.restore(tmp_path / "ckpt", abstract))
    _close(nnx.state(theirs), nnx.state(ours), rtol=0, atol=0)
    theirs.eval()
    ours.eval()
    _close(theirs(x), ours(x))


# ---------------------------------------------------------------- bad batches (docs/contract.md)
# References from the definition, float64: a feature whose batch has inf/NaN keeps its running stats, the others
# take the EMA of their batch moments; masked-out NaN changes nothing; momentum=None across an all-masked batch is
# the plain average of the batches that contributed.


def _stats(layer):
    out = {"mean": np.array(layer.mean[...]), "var": np.array(layer.var[...])}
    if layer.momentum is None:
        out["count"] = np.array(layer.count[...])
    return out


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_keep_their_running_stats(bad):
    layer = BN(3, momentum=0.9, rngs=nnx.Rngs(0))
    layer(_normal(11, (16, 3)) * 2.0 + 1.0)  # running stats away from their initial values
    before = _stats(layer)
    x2 = _normal(12, (16, 3)) + 3.0
    x2[5, 1] = bad
    layer(x2)
    after = _stats(layer)
    # the shared float64 reference: feature 1 (non-finite batch moments) keeps its values, 0 and 2 update
    mean, var, n = ref.moments(x2, -1)
    want_mean, want_var, _ = ref.update(before["mean"], before["var"], 0, mean, var, n, momentum=0.9)
    np.testing.assert_allclose(after["mean"], want_mean, **F32)
    np.testing.assert_allclose(after["var"], want_var, **F32)
    np.testing.assert_array_equal(after["mean"][1], before["mean"][1])
    np.testing.assert_array_equal(after["var"][1], before["var"][1])


def test_an_entirely_non_finite_batch_is_a_no_op_count_included():
    layer = BN(3, momentum=None, rngs=nnx.Rngs(0))
    layer(_normal(13, (8, 3)))
    before = _stats(layer)
    nnx.jit(lambda m, x: m(x))(layer, jnp.full((8, 3), jnp.inf))
    jax.tree.map(np.testing.assert_array_equal, _stats(layer), before)
    assert int(before["count"]) == 1


def test_nan_in_masked_entries_changes_nothing():
    x = _normal(14, (12, 3)) + 2.0
    mask = np.ones((12, 1), bool)
    mask[[2, 7]] = False
    dirty = x.copy()
    dirty[[2, 7]] = np.nan
    clean_layer, dirty_layer = BN(3, momentum=0.9, rngs=nnx.Rngs(0)), BN(3, momentum=0.9, rngs=nnx.Rngs(0))
    y_clean, y_dirty = clean_layer(x, mask=mask), dirty_layer(dirty, mask=mask)
    jax.tree.map(np.testing.assert_array_equal, _stats(dirty_layer), _stats(clean_layer))
    np.testing.assert_array_equal(np.asarray(y_dirty)[mask[:, 0]], np.asarray(y_clean)[mask[:, 0]])
    kept = x.astype(np.float64)[mask[:, 0]]
    np.testing.assert_allclose(_stats(clean_layer)["var"], 0.9 + 0.1 * kept.var(0), **F32)


def test_cumulative_average_skips_an_all_masked_batch():
    layer = BN(2, momentum=None, rngs=nnx.Rngs(0))
    batches = [_normal(s, (8, 2)) * (1 + s) + s for s in (15, 16, 17)]
    for x, m in zip(batches, [None, np.zeros((8, 1), bool), None], strict=True):
        layer(x, mask=m)
    got = _stats(layer)
    contributing = [batches[0].astype(np.float64), batches[2].astype(np.float64)]
    np.testing.assert_allclose(got["mean"], np.mean([b.mean(0) for b in contributing], 0), **F32)
    np.testing.assert_allclose(got["var"], np.mean([b.var(0) for b in contributing], 0), **F32)
    assert int(got["count"]) == 2
