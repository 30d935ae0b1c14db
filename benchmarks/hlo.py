"""What a compiled program costs, read off XLA's optimized HLO: the one HLO analysis of benchmarks.

Every figure here is deterministic (the same program compiles to the same
HLO), unlike wall time:

* collectives by kind, with the bytes each produces per device
  (`parse_collectives`, `count_collectives`, `collective_bytes`);
* kernels: the instructions of the optimized module that launch work
  (fusions, convolutions, custom calls, collectives, ...; free instructions
  such as parameters, constants, tuples and bitcasts excluded)
  (`count_kernels`), and its `conditional` instructions (`count_conditionals`);
* full-size passes: the bytes those kernels read and write of arrays at
  least as large as a given one, in units of its bytes (`full_size_passes`);
* bytes accessed, from `compiled.cost_analysis()`, and temp bytes, from
  `compiled.memory_analysis()` (`analyze`).

Used by the layer benchmark, the whole-model benchmark, the sync-BN
collective table and the docs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax

#: The collective kinds counted, in table order.
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

#: Instructions that launch no work of their own.
FREE_OPCODES = frozenset(
    {
        "parameter",
        "constant",
        "get-tuple-element",
        "tuple",
        "bitcast",
        "opt-barrier",
        "after-all",
        "partition-id",
        "replica-id",
        "add-dependency",
    }
)
#: Instructions whose work is counted inside the computations they call.
CONTROL_OPCODES = frozenset({"call", "while"})

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = r"\((?:[^()]|\([^()]*\))*\)|[a-z][a-z0-9]*\[[0-9,]*\](?:\{[^}]*\})?"
_INSTR_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>"
    + _SHAPE
    + r")\s+(?P<opcode>[a-z][a-z0-9\-]*)\((?P<rest>.*)$"
)
_COMP_RE = re.compile(r"^\s*(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_GROUPS_RE = re.compile(r"replica_groups=(\{\{[^=]*?\}\}|\[[0-9,]+\]<=\[[0-9,]+\][^,\s]*)")
_CALLED_RE = re.compile(r"(?:to_apply|body|condition|calls)=%?([\w.\-]+)")
_OPERAND_RE = re.compile(r"%([\w.\-]+)")


class Instruction(NamedTuple):
    """One HLO instruction: its name, result shape (as printed), opcode and the text after the opening paren."""

    name: str
    shape: str
    opcode: str
    rest: str


class CollectiveOp(NamedTuple):
    """One collective instruction of a compiled HLO module.

    Attributes:
      kind: one of `KINDS`.
      shape: the HLO result shape, as printed.
      bytes: bytes of the result on each device (for an async `-start` op
        returning a tuple, the last array: the result buffer).
      group_size: participants per replica group, or None if not printed.
    """

    kind: str
    shape: str
    bytes: int
    group_size: int | None


class Cost(NamedTuple):
    """The deterministic cost of one compiled program.

    Attributes:
      kernels: instructions that launch work (see `count_kernels`).
      bytes_accessed: XLA's cost analysis, "bytes accessed".
      temp_bytes: XLA's memory analysis, temp buffers.
      collectives: `{kind: count}` for every kind of `KINDS`, the whole program.
      compile_s: seconds `lower(...).compile()` took (not deterministic).
      conditionals: `conditional` instructions (`count_conditionals`).
    """

    kernels: int
    bytes_accessed: float
    temp_bytes: int
    collectives: dict[str, int]
    compile_s: float
    conditionals: int = 0


def array_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (a tuple sums its elements).

    >>> array_bytes("(f32[2,3]{1,0}, bf16[4]{0})")
    32
    """
    total = 0
    for dtype, dims in _ARRAY_RE.findall(shape):
        total += _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _elements(shape: str) -> int:
    """Elements of the largest array in an HLO shape string."""
    return max((math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY_RE.findall(shape)), default=0)


def computations(hlo_text: str) -> tuple[dict[str, list[Instruction]], str | None]:
    """Splits HLO module text into `{computation name: instructions}` and the entry computation's name."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_RE.match(line)
            if m and not line.lstrip().startswith("HloModule"):
                current = m.group("name")
                comps[current] = []
                if m.group("entry"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        i = _INSTR_RE.match(line)
        if i:
            comps[current].append(Instruction(i["name"], i["shape"], i["opcode"], i["rest"]))
    return comps, entry


def kernels(hlo_text: str) -> Iterator[tuple[Instruction, dict[str, str]]]:
    """The instructions of the entry computation that launch work, with the shapes of their computation's values.

    Calls and whiles are followed into the computations they run (a while
    body counts once, not per iteration); fusions count as one kernel each
    (their fused computations are not entered).
    """
    comps, entry = computations(hlo_text)
    if entry is None:
        return

    def walk(name: str) -> Iterator[tuple[Instruction, dict[str, str]]]:
        instrs = comps.get(name, [])
        shapes = {i.name: i.shape for i in instrs}
        for instr in instrs:
            if instr.opcode in CONTROL_OPCODES:
                for callee in _CALLED_RE.findall(instr.rest):
                    yield from walk(callee)
            elif instr.opcode not in FREE_OPCODES and not instr.opcode.endswith("-done"):
                yield instr, shapes

    yield from walk(entry)


def count_kernels(hlo_text: str) -> int:
    """Number of kernels the optimized module launches (see `kernels`; async start/done pairs count once).

    >>> count_kernels('''ENTRY %main (p: f32[4]) -> f32[4] {
    ...   %p = f32[4]{0} parameter(0)
    ...   %c = f32[] constant(1)
    ...   %f = f32[4]{0} fusion(%p, %c), kind=kLoop, calls=%fused
    ...   ROOT %b = f32[4]{0} bitcast(%f)
    ... }''')
    1
    """
    return sum(1 for _ in kernels(hlo_text))


def count_conditionals(hlo_text: str) -> int:
    """Instructions with opcode `conditional` (what `lax.cond` and `lax.switch` compile to) in HLO text.

    >>> count_conditionals("%c = f32[4]{0} conditional(%p, %x, %y), true_computation=%t, false_computation=%f")
    1
    """
    return sum(1 for line in hlo_text.splitlines() if (m := _INSTR_RE.match(line)) and m["opcode"] == "conditional")


def full_size_passes(hlo_text: str, elements: int, itemsize: int) -> float:
    """Full-size traffic of the kernels, in units of one array of `elements` entries of `itemsize` bytes.

    Each kernel reads its operands and writes its result once; of those,
    every array with at least `elements` entries counts its bytes. The sum,
    divided by `elements * itemsize`, is the number of passes over
    "full-size" data (an f32 temporary of a bf16 input counts two).

    >>> full_size_passes('''ENTRY %main (p: f32[64]) -> f32[] {
    ...   %p = f32[64]{0} parameter(0)
    ...   %e = f32[64]{0} fusion(%p), kind=kLoop, calls=%exp
    ...   ROOT %r = f32[] fusion(%e), kind=kLoop, calls=%sum
    ... }''', 64, 4)
    3.0
    """
    total = 0
    for instr, shapes in kernels(hlo_text):
        arrays = [instr.shape] + [shapes[o] for o in _OPERAND_RE.findall(instr.rest.split("),", 1)[0]) if o in shapes]
        total += sum(array_bytes(s) for s in arrays if _elements(s) >= elements)
    return total / (elements * itemsize)


def _group_size(line: str) -> int | None:
    m = _GROUPS_RE.search(line)
    if m is None:
        return None
    groups = m.group(1)
    if groups.startswith("{{"):
        first = groups[2:].split("}", 1)[0]
        return len([g for g in first.split(",") if g.strip()])
    dims = groups[1:].split("]", 1)[0].split(",")  # iota form [num_groups,group_size]<=[...]
    return int(dims[-1])


def parse_collectives(hlo_text: str) -> list[CollectiveOp]:
    """Every collective instruction in HLO text (`-done` halves of async pairs skipped).

    Args:
      hlo_text: HLO module text, e.g. `jax.jit(f).lower(x).compile().as_text()`.

    Returns:
      One `CollectiveOp` per instruction, in program order.

    >>> hlo = "%ar = f32[2,16]{1,0} all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%sum"
    >>> parse_collectives(hlo)
    [CollectiveOp(kind='all-reduce', shape='f32[2,16]{1,0}', bytes=128, group_size=4)]
    """
    ops = []
    for line in hlo_text.splitlines():
        m = _INSTR_RE.match(line)
        if m is None:
            continue
        kind, _, suffix = m["opcode"].partition("-start") if m["opcode"].endswith("-start") else (m["opcode"], "", "")
        if kind not in KINDS:
            continue
        arrays = ["{}[{}]".format(*a) for a in _ARRAY_RE.findall(m["shape"])]
        if m["opcode"].endswith("-start") and kind == "all-gather":
            arrays = arrays[len(arrays) // 2 :]  # (operands..., results...)
        elif m["opcode"].endswith("-start") and kind == "collective-permute":
            arrays = arrays[1:2]  # (operand, result, context...)
        ops.append(CollectiveOp(kind, m["shape"], sum(array_bytes(a) for a in arrays), _group_size(line)))
    return ops


def summarize_collectives(ops: Sequence[CollectiveOp]) -> tuple[dict[str, int], dict[str, int]]:
    """(count per kind, result bytes per kind) of `ops`; every kind of `KINDS` is a key."""
    counts = dict.fromkeys(KINDS, 0)
    nbytes = dict.fromkeys(KINDS, 0)
    for op in ops:
        counts[op.kind] += 1
        nbytes[op.kind] += op.bytes
    return counts, nbytes


def compiled_text(fn: Callable[..., object], *args: object) -> str:
    """The optimized HLO text of `jax.jit(fn)` for `args`."""
    return jax.jit(fn).lower(*args).compile().as_text() or ""


def count_collectives(fn: Callable[..., object], *args: object) -> dict[str, int]:
    """Counts the collectives of `jax.jit(fn)` compiled for `args`, by kind, over the whole program.

    The count is taken on the optimized HLO, so collectives XLA combines
    count once and async start/done pairs count once.

    Args:
      fn: a function `jax.jit` can trace.
      *args: example arguments (arrays, placed or sharded as in real use).

    Returns:
      `{kind: count}` for every kind of `KINDS` (zeros included).

    >>> import jax.numpy as jnp
    >>> count_collectives(lambda x: jnp.sum(x ** 2), jnp.ones(4))["all-reduce"]
    0
    """
    return summarize_collectives(parse_collectives(compiled_text(fn, *args)))[0]


def collective_bytes(fn: Callable[..., object], *args: object) -> dict[str, int]:
    """Bytes produced per device by each kind of collective in `jax.jit(fn)` for `args`.

    Read off the HLO result shapes: an all-reduce of a `(2, 256)` float32
    array counts 2048 bytes, an all-gather over 8 devices of `(3, 256)`
    float32 counts its `(8, 3, 256)` result, 24576 bytes.

    Returns:
      `{kind: bytes}` for every kind of `KINDS` (zeros included).

    >>> import jax.numpy as jnp
    >>> collective_bytes(lambda x: x + 1, jnp.ones(4))["all-gather"]
    0
    """
    return summarize_collectives(parse_collectives(compiled_text(fn, *args)))[1]


def bytes_accessed(compiled: jax.stages.Compiled) -> float:
    """XLA's "bytes accessed" estimate of a compiled program (`cost_analysis`), 0 if unavailable."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("bytes accessed", 0.0))


def temp_bytes(compiled: jax.stages.Compiled) -> int:
    """Bytes of temporary buffers of a compiled program (`memory_analysis`), 0 if unavailable."""
    mem = compiled.memory_analysis()
    return int(getattr(mem, "temp_size_in_bytes", 0) or 0)


def analyze(compiled: jax.stages.Compiled, compile_s: float = 0.0) -> Cost:
    """The `Cost` of a compiled program.

    >>> import jax, jax.numpy as jnp
    >>> cost = analyze(jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(8)).compile())
    >>> cost.kernels, cost.collectives["all-reduce"]
    (1, 0)
    """
    text = compiled.as_text() or ""
    collectives = summarize_collectives(parse_collectives(text))[0]
    return Cost(
        count_kernels(text), bytes_accessed(compiled), temp_bytes(compiled), collectives, compile_s,
        count_conditionals(text),
    )
