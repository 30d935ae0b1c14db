"""benchmarks.hlo: the HLO counters on hand-made HLO text and on tiny programs with a known answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import hlo

needs8 = pytest.mark.usefixtures("eight_devices")  # fewer devices: a failure saying why, never a skip

COLLECTIVES = """
HloModule m
  %all-reduce.1 = (f32[1,16]{1,0}, f32[1,16]{1,0}) all-reduce(%a, %b), replica_groups={{0,1,2,3},{4,5,6,7}}
  %ag = f32[8,3,1,16]{3,2,1,0} all-gather(%p), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
  %ags = ((bf16[4]{0}), bf16[32]{0}) all-gather-start(%q), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = bf16[32]{0} all-gather-done(%ags)
  %rs = f32[2]{0} reduce-scatter(%r), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%s), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[4]{0} collective-permute-done(%cps)
  %a2a = s32[8,2]{1,0} all-to-all(%t), replica_groups={{0,1}}, dimensions={0}
  %not = f32[4]{0} add(%all-reduce.2, %x)
"""

# Two fusions and a convolution in the entry, a while loop whose body holds one more fusion,
# and free instructions (parameters, constants, tuples, bitcasts, get-tuple-element, opt-barrier).
MODULE = """
HloModule jit_f, entry_computation_layout={(f32[8,64]{1,0})->f32[]}

%fused_exp (p0: f32[8,64]) -> f32[8,64] {
  %p0 = f32[8,64]{1,0} parameter(0)
  ROOT %e = f32[8,64]{1,0} exponential(%p0)
}

%body (s: (f32[8,64], s32[])) -> (f32[8,64], s32[]) {
  %s = (f32[8,64]{1,0}, s32[]) parameter(0)
  %v = f32[8,64]{1,0} get-tuple-element(%s), index=0
  %i = s32[] get-tuple-element(%s), index=1
  %f = f32[8,64]{1,0} fusion(%v), kind=kLoop, calls=%fused_exp
  ROOT %t = (f32[8,64]{1,0}, s32[]) tuple(%f, %i)
}

%cond (c: (f32[8,64], s32[])) -> pred[] {
  %c = (f32[8,64]{1,0}, s32[]) parameter(0)
  ROOT %k = pred[] constant(false)
}

ENTRY %main (x: f32[8,64]) -> f32[] {
  %x = f32[8,64]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %b = (f32[8,64]{1,0}) opt-barrier(%x)
  %x1 = f32[8,64]{1,0} get-tuple-element(%b), index=0
  %e1 = f32[8,64]{1,0} fusion(%x1), kind=kLoop, calls=%fused_exp
  %w0 = (f32[8,64]{1,0}, s32[]) tuple(%e1, %zero)
  %w = (f32[8,64]{1,0}, s32[]) while(%w0), condition=%cond, body=%body
  %e2 = f32[8,64]{1,0} get-tuple-element(%w), index=0
  %bc = f32[512]{0} bitcast(%e2)
  ROOT %r = f32[] fusion(%bc, %x), kind=kInput, calls=%fused_sum
}
"""


def test_parse_collectives_kinds_bytes_and_groups():
    ops = hlo.parse_collectives(COLLECTIVES)
    assert [(o.kind, o.bytes, o.group_size) for o in ops] == [
        ("all-reduce", 128, 4),
        ("all-gather", 8 * 3 * 16 * 4, 8),
        ("all-gather", 64, 8),  # async pair counted once, by its result
        ("reduce-scatter", 8, 4),
        ("collective-permute", 16, None),
        ("all-to-all", 64, 2),
    ]
    counts, nbytes = hlo.summarize_collectives(ops)
    assert counts == {"all-reduce": 1, "all-gather": 2, "reduce-scatter": 1, "collective-permute": 1, "all-to-all": 1}
    assert nbytes["all-gather"] == 1536 + 64


def test_count_kernels_on_hand_made_hlo():
    # e1, the while body's fusion, r: three kernels; the rest launches nothing.
    assert hlo.count_kernels(MODULE) == 3
    # async collectives count once (the -done half is not a kernel)
    assert hlo.count_kernels("ENTRY %m () -> f32[] {\n" + COLLECTIVES + "\n}") == 7


def test_full_size_passes_on_hand_made_hlo():
    # e1 reads x and writes e1 (2), the body's fusion reads v, writes f (2), r reads bc and x (2): 6 passes
    # of an f32[8,64]; with a bf16 unit of the same size, each f32 pass counts twice.
    assert hlo.full_size_passes(MODULE, 512, 4) == 6.0
    assert hlo.full_size_passes(MODULE, 512, 2) == 12.0
    assert hlo.full_size_passes(MODULE, 513, 4) == 0.0


def test_array_bytes():
    assert hlo.array_bytes("(f32[2,3]{1,0}, bf16[4]{0}, pred[])") == 24 + 8 + 1


def test_analyze_a_tiny_function():
    x = jnp.ones((256, 128), jnp.float32)
    compiled = jax.jit(lambda v: jnp.exp(v) * 2.0).lower(x).compile()
    cost = hlo.analyze(compiled)
    assert cost.kernels == 1  # one fused elementwise loop
    assert cost.bytes_accessed == pytest.approx(2 * x.nbytes, rel=0.01)  # read x, write the result
    assert hlo.full_size_passes(compiled.as_text(), x.size, 4) == 2.0
    assert sum(cost.collectives.values()) == 0
    # Two outputs that XLA cannot fuse into one loop need a temp or not, but never negative bytes.
    assert cost.temp_bytes >= 0


@needs8
def test_count_collectives_of_a_jitted_shard_map():
    mesh = jax.make_mesh((8,), ("d",))
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("d")))
    f = jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"), out_specs=P())
    assert hlo.count_collectives(f, x) == {**dict.fromkeys(hlo.KINDS, 0), "all-reduce": 1}
    assert hlo.collective_bytes(f, x)["all-reduce"] == 4 * 4


@needs8
def test_three_dependent_psums_are_three_all_reduces():
    mesh = jax.make_mesh((8,), ("d",))
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("d")))

    def f(v):
        a = jax.lax.psum(v, "d")
        b = jax.lax.psum(jnp.exp(a), "d")  # depends on a: cannot be combined with it
        return jax.lax.psum(jnp.sin(b), "d")

    g = jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P())
    assert hlo.count_collectives(g, x)["all-reduce"] == 3
    assert hlo.analyze(jax.jit(g).lower(x).compile()).collectives["all-reduce"] == 3


def test_count_conditionals_of_compiled_programs():
    x = jnp.arange(8.0)
    branchy = jax.jit(lambda v: jax.lax.cond(v[0] > 0, jnp.sin, jnp.cos, v)).lower(x).compile()
    plain = jax.jit(jnp.sin).lower(x).compile()
    assert hlo.count_conditionals(branchy.as_text()) == hlo.analyze(branchy).conditionals == 1
    assert hlo.count_conditionals(plain.as_text()) == hlo.analyze(plain).conditionals == 0
