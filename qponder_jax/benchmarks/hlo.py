"""Reading a compiled XLA program (`jax.jit(f).lower(...).compile().as_text()`): its loops, collectives, matmul
FLOPs and HBM bytes, per phase, per device.

    module = hlo.parse(compiled.as_text())
    costs = hlo.phase_costs(module, hlo.phase_by_scope(PHASES))   # phase -> Cost
    body = hlo.cost(module, hlo.decode_loops(module)[0].body)      # one iteration of the early-exit loop

The text is the SPMD-partitioned program of ONE device, so every figure is per device. Loops count by their trip
count (XLA's `known_trip_count`), nested ones multiplied; a while loop without one (the sampler's early-exit decode
loop) counts ONE iteration and goes to its own phase, `DECODE_STEP`. XLA's own `cost_analysis()` counts every loop
body once, whatever its trip count, which is why this reader exists.

What is counted:
- FLOPs: 2 x M x N x K of every `dot` (and cuBLAS gemm custom call) and convolution, fused or not: matmul FLOPs only.
- HBM bytes: every top-level instruction (a fusion is one kernel) reads its operands and writes its result once,
  as XLA's cost analysis counts them; a fusion operand read only through (dynamic-)slices or gathers counts what
  they read, and an in-place dynamic-update-slice (the KV cache write) counts the update, not the buffer. XLA:CPU
  has no bf16 GEMM, so it widens bf16 weights to f32 before every matmul; such a convert counts nothing and its
  matmul reads the bf16 value, as on an accelerator. A model of traffic, not a measurement: XLA:CPU fuses
  differently from XLA:GPU/TPU.
- Collectives: `collectives` and `by_dtype` are the bytes of the arrays the compiled program moves (all-gather: its
  result; reduce-scatter: its operand; all-reduce, all-to-all, collective-permute: the operand) by kind, and by kind
  and the values' type ("bf16 (as f32)": XLA:CPU has no bf16 collectives and widens them). `wire` and `by_group`
  are the bytes each device receives over the interconnect with ring algorithms on a group of n devices ((n-1)/n of
  the array, twice for an all-reduce), at the values' own width: what an accelerator moves.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable

from qponder_jax.benchmarks.hlo_text import (  # noqa: F401  (parse and decode_loops are this module's API too)
    ELEMENT_BYTES,
    Computation,
    Instruction,
    Module,
    array_shapes,
    decode_loops,
    parse,
    shape_bytes,
)

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DECODE_STEP = "decode step"  # the phase of a while loop without a known trip count (one iteration)
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
               "replica-id", "while", "call", "conditional", "opt-barrier"}  # fmt: skip


@dataclasses.dataclass
class Cost:
    """Per-device totals of one part of a program."""

    flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: dict[str, float] = dataclasses.field(default_factory=dict)  # kind -> bytes of the arrays moved
    by_dtype: dict[str, float] = dataclasses.field(default_factory=dict)  # "kind element-type" -> bytes
    wire: dict[str, float] = dataclasses.field(default_factory=dict)  # kind -> bytes received per device (ring)
    by_group: dict[str, float] = dataclasses.field(default_factory=dict)  # devices per group (str) -> wire bytes

    def add(self, other: Cost, times: float = 1.0) -> None:
        self.flops += other.flops * times
        self.hbm_bytes += other.hbm_bytes * times
        for mine, theirs in ((self.collectives, other.collectives), (self.by_dtype, other.by_dtype),
                             (self.wire, other.wire), (self.by_group, other.by_group)):  # fmt: skip
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0.0) + v * times

    @property
    def collective_bytes(self) -> float:
        return sum(self.collectives.values())

    @property
    def wire_bytes(self) -> float:
        return sum(self.wire.values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Cost:
        return cls(**d)


def group_size(ins: Instruction, num_partitions: int) -> int:
    """Devices in each replica group of a collective (all of them when the groups are not listed)."""
    attrs = ins.attrs
    # mesh['a'=4,'b'=2] {'a'}, possibly with ", device_ids=(...)" before the braces
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        n = 1
        for axis in re.findall(r"'([^']+)'", m.group(2)):
            n *= sizes.get(axis, 1)
        return n
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)  # iota form [groups, size]<=[...]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)  # {{0,1,2,3},{4,5,6,7}}
    if m:
        return len(m.group(1).split(","))
    if ins.opcode.startswith("collective-permute"):
        return 2
    return num_partitions


def _collective(module: Module, ins: Instruction, comp: Computation) -> Cost | None:
    kind = next((k for k in COLLECTIVES if ins.opcode in (k, f"{k}-start")), None)
    if kind is None:
        return None
    operands = [comp.by_name[o].shape for o in ins.operands if o in comp.by_name]
    operand_bytes = sum(shape_bytes(s) for s in operands)
    moved = shape_bytes(ins.shape) if kind == "all-gather" else operand_bytes
    if kind == "all-gather" and ins.opcode.endswith("-start"):  # (operand, result) tuple
        moved = shape_bytes(ins.shape) - operand_bytes
    dtype = (array_shapes(operands[0]) or [("?", ())])[0][0] if operands else "?"
    narrow = _widened_from(module, comp, comp.by_name.get(ins.operands[0])) if ins.operands else None
    on_wire = moved
    if narrow is not None:  # XLA:CPU widens narrow collectives to f32; an accelerator moves the narrow type
        on_wire = moved * ELEMENT_BYTES[narrow] / ELEMENT_BYTES[dtype]
        dtype = f"{narrow} (as {dtype})"
    n = max(group_size(ins, module.num_partitions), 1)
    wire = on_wire * (n - 1) / n * (2 if kind == "all-reduce" else 1) if kind != "collective-permute" else on_wire
    return Cost(
        collectives={kind: moved}, by_dtype={f"{kind} {dtype}": moved}, wire={kind: wire}, by_group={str(n): wire}
    )


def _widened_from(module: Module, caller: Computation, producer: Instruction | None) -> str | None:
    """The narrower float type a collective's f32 operand was just widened from (a convert, or a fusion ending in
    one, of a bf16 / f16 value, possibly followed by layout changes), else None."""
    if producer is None or not producer.shape.startswith("f32"):
        return None
    comp, root = caller, producer
    if producer.opcode == "fusion":
        comp = module.computations[producer.attr_computations("calls")[0]]
        root = comp.root
    while (
        root.opcode in ("copy", "bitcast", "transpose", "reshape")
        and root.operands[:1]
        and root.operands[0] in comp.by_name
    ):
        root = comp.by_name[root.operands[0]]  # layout changes of the widened value
    if root.opcode != "convert" or not root.operands or root.operands[0] not in comp.by_name:
        return None
    narrow = (array_shapes(comp.by_name[root.operands[0]].shape) or [("?", ())])[0][0]
    return narrow if narrow in ("bf16", "f16") else None


def _dot_flops(ins: Instruction, comp: Computation) -> float:
    out = array_shapes(ins.shape)
    if not out or not ins.operands or ins.operands[0] not in comp.by_name:
        return 0.0
    lhs = array_shapes(comp.by_name[ins.operands[0]].shape)
    if not lhs:
        return 0.0
    if ins.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        contracting = [int(d) for d in m.group(1).split(",") if d] if m else []
    else:  # a gemm custom call: the dimension numbers are in its backend config
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
        contracting = [int(d) for d in re.findall(r"\d+", m.group(1))] if m else []
    k = 1
    for d in contracting:
        k *= lhs[0][1][d]
    n = 1
    for d in out[0][1]:
        n *= d
    return 2.0 * n * k


def _conv_flops(ins: Instruction, comp: Computation) -> float:
    out = array_shapes(ins.shape)
    rhs = array_shapes(comp.by_name[ins.operands[1]].shape) if len(ins.operands) > 1 else []
    m = re.search(r"dim_labels=\w+_(\w+)->", ins.attrs)
    if not out or not rhs or not m or "o" not in m.group(1):
        return 0.0
    kernel = rhs[0][1]
    per_output = 1
    for i, d in enumerate(kernel):
        if i != m.group(1).index("o"):
            per_output *= d
    n = 1
    for d in out[0][1]:
        n *= d
    return 2.0 * n * per_output


def _flops(module: Module, comp: Computation) -> float:
    """Matmul FLOPs of one execution of a (fused) computation, nested fusions included."""
    total = 0.0
    for ins in comp.instructions:
        if ins.opcode == "dot" or (ins.opcode == "custom-call" and re.search(r"gemm|matmul", ins.attrs)):
            total += _dot_flops(ins, comp)
        elif ins.opcode == "convolution":
            total += _conv_flops(ins, comp)
        elif ins.opcode == "fusion":
            for name in ins.attr_computations("calls"):
                total += _flops(module, module.computations[name])
    return total


def _users(comp: Computation) -> dict[str, list[Instruction]]:
    users: dict[str, list[Instruction]] = {}
    for ins in comp.instructions:
        for o in ins.operands:
            users.setdefault(o, []).append(ins)
    return users


def _fusion_bytes(module: Module, ins: Instruction, size: Callable[[str], float]) -> float:
    """HBM bytes of one fusion: its operands (only what is read of an operand that is only sliced or gathered from)
    and its result (only the update of an in-place dynamic-update-slice)."""
    fused = module.computations[ins.attr_computations("calls")[0]]
    users = _users(fused)
    params = {int(f.args): f for f in fused.instructions if f.opcode == "parameter" and f.args.strip().isdigit()}
    param_names = {p.name for p in params.values()}
    roots = [fused.root]
    if fused.root.opcode == "tuple":
        roots = [fused.by_name[o] for o in fused.root.operands if o in fused.by_name]
    total = shape_bytes(ins.shape)
    in_place: set[str] = set()
    for r in roots:
        if r.opcode == "dynamic-update-slice" and len(r.operands) > 1 and r.operands[0] in param_names:
            in_place.add(r.operands[0])
            update = fused.by_name.get(r.operands[1])
            total -= shape_bytes(r.shape) - (shape_bytes(update.shape) if update else 0.0)
    for index, operand in enumerate(ins.operands):
        param = params.get(index)
        if param is not None and param.name in in_place:
            continue
        read = size(operand)
        readers = users.get(param.name, []) if param is not None else []
        if readers and all(_reads_part(r, param.name) for r in readers):
            read = min(read, sum(shape_bytes(r.shape) for r in readers))
        total += read
    return max(total, 0.0)


def _reads_part(reader: Instruction, operand: str) -> bool:
    """Whether `reader` reads only part of `operand`: a (dynamic-)slice of it, or a gather from it."""
    gather = reader.opcode == "gather" and reader.operands[:1] == [operand]
    return gather or reader.opcode in ("slice", "dynamic-slice")


def _traffic(module: Module, ins: Instruction, comp: Computation, widened: dict[str, float]) -> float:
    """HBM bytes one execution of a top-level instruction reads and writes; an XLA:CPU widening convert (`widened`)
    moves nothing and its consumers read the narrow value."""
    if ins.opcode in _NO_TRAFFIC or ins.opcode.endswith("-done") or ins.name in widened:
        return 0.0
    size = lambda o: shape_bytes(comp.by_name[o].shape) * widened.get(o, 1.0) if o in comp.by_name else 0.0
    if ins.opcode == "fusion":
        return _fusion_bytes(module, ins, size)
    if ins.opcode in ("slice", "dynamic-slice", "gather"):
        return 2 * shape_bytes(ins.shape)
    if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
        return 2 * size(ins.operands[1])
    return shape_bytes(ins.shape) + sum(size(o) for o in ins.operands)


def _widenings(module: Module, comp: Computation) -> dict[str, float]:
    """{name: narrow / f32 size} of the instructions that only widen a bf16 / f16 value to f32 for matmuls: XLA:CPU
    has no bf16 GEMM and converts the weights at every use (every decode step); an accelerator reads them narrow."""
    users = _users(comp)
    out = {}
    for ins in comp.instructions:
        if ins.opcode not in ("convert", "fusion") or not ins.shape.startswith("f32"):
            continue
        if ins.opcode == "fusion":
            fused = module.computations[ins.attr_computations("calls")[0]]
            if not {i.opcode for i in fused.instructions} <= {"parameter", "convert", "copy", "bitcast", "transpose"}:
                continue
            narrow = _widened_from(module, comp, ins)
        else:
            source = comp.by_name.get(ins.operands[0]) if ins.operands else None
            narrow = (array_shapes(source.shape) or [("?", ())])[0][0] if source is not None else None
        readers = users.get(ins.name, [])
        if narrow in ("bf16", "f16") and readers and all(_multiplies(module, r) for r in readers):
            out[ins.name] = ELEMENT_BYTES[narrow] / ELEMENT_BYTES["f32"]
    return out


def _multiplies(module: Module, ins: Instruction) -> bool:
    if ins.opcode in ("dot", "convolution"):
        return True
    if ins.opcode == "fusion":
        fused = module.computations[ins.attr_computations("calls")[0]]
        return any(i.opcode in ("dot", "convolution") for i in fused.instructions)
    return False


def cost(module: Module, computation: str | None = None, times: float = 1.0) -> Cost:
    """Every phase of one execution of `computation` (default: the entry) added into one Cost."""
    total = Cost()
    for c in phase_costs(module, lambda _: "", computation, times).values():
        total.add(c)
    return total


def phase_costs(
    module: Module, phase_of: Callable[[str], str], computation: str | None = None, times: float = 1.0
) -> dict[str, Cost]:
    """{phase: Cost} of one execution of `computation` (default: the entry). `phase_of(op_name)` names an
    instruction's phase from its metadata ("" = its caller's); the body of a loop without a known trip count is
    `DECODE_STEP`, one iteration, whatever its metadata."""
    out: dict[str, Cost] = {}
    _walk(module, module.computations[computation or module.entry], times, "other", phase_of, out, set())
    return out


def _walk(module: Module, comp: Computation, times: float, phase: str, phase_of, out: dict, stack: set) -> None:
    if comp.name in stack:  # recursion does not occur in XLA programs; guard anyway
        return
    stack = stack | {comp.name}
    phases = {} if phase == DECODE_STEP else _phases(comp, phase_of)
    widened = _widenings(module, comp)
    for ins in comp.instructions:
        here = phases.get(ins.name) or phase
        acc = out.setdefault(here, Cost())
        if ins.opcode == "while":
            n = ins.trip_count
            body_phase, body_times = (DECODE_STEP, 1.0) if n is None else (here, times * n)
            for name in ins.attr_computations("condition"):
                _walk(module, module.computations[name], body_times, body_phase, phase_of, out, stack)
            _walk(module, module.computations[ins.body], body_times, body_phase, phase_of, out, stack)
        elif ins.opcode == "conditional":  # the most expensive branch (the update, not the skip)
            branches = ins.attr_computations("branch_computations") or (
                ins.attr_computations("true_computation") + ins.attr_computations("false_computation")
            )
            costs = []
            for name in branches:
                branch: dict[str, Cost] = {}
                _walk(module, module.computations[name], times, here, phase_of, branch, stack)
                costs.append(branch)
            if costs:
                worst = max(costs, key=lambda b: sum(c.flops + c.hbm_bytes for c in b.values()))
                for k, c in worst.items():
                    out.setdefault(k, Cost()).add(c)
        elif ins.opcode in ("call", "async-start") or ins.opcode.endswith("-start") and "calls=" in ins.attrs:
            for name in ins.attr_computations("to_apply") + ins.attr_computations("calls"):
                _walk(module, module.computations[name], times, here, phase_of, out, stack)
        else:
            collective = _collective(module, ins, comp)
            if collective is not None:
                acc.add(collective, times)
            acc.hbm_bytes += _traffic(module, ins, comp, widened) * times
            if ins.opcode == "fusion":
                acc.flops += sum(_flops(module, module.computations[n]) for n in ins.attr_computations("calls")) * times
            elif ins.opcode in ("dot", "convolution", "custom-call"):
                acc.flops += _flops(module, Computation(comp.name, [ins], comp.by_name)) * times


def _phases(comp: Computation, phase_of) -> dict[str, str]:
    """Each instruction's phase from its metadata; one without (made by a compiler pass) takes its users' phase, else
    its operands'."""
    phases = {ins.name: phase_of(ins.op_name) for ins in comp.instructions}
    users = _users(comp)
    for ins in reversed(comp.instructions):
        if not phases[ins.name]:
            phases[ins.name] = next((phases[u.name] for u in users.get(ins.name, []) if phases[u.name]), "")
    for ins in comp.instructions:
        if not phases[ins.name]:
            phases[ins.name] = next((phases[o] for o in ins.operands if phases.get(o)), "")
    return phases


def phase_by_scope(scopes: Iterable[tuple[str, str]]) -> Callable[[str], str]:
    """phase_of(op_name) for `phase_costs`: the phase of the first (phase, scope) whose scope is a component of the
    op_name path (`jax.named_scope` names and `jit(fn)` land there), else ""."""
    scopes = list(scopes)

    def phase_of(op_name: str) -> str:
        parts = op_name.split("/")
        return next((phase for phase, scope in scopes if scope in parts), "")

    return phase_of


def dumps(costs: dict[str, Cost]) -> str:
    return json.dumps({k: v.to_dict() for k, v in costs.items()})
