"""The text of a compiled XLA program (`compiled.as_text()`) as computations of instructions: their shapes, operands,
attributes, called computations and loop trip counts. `benchmarks.hlo` costs what this reads.
"""

from __future__ import annotations

import dataclasses
import re

ELEMENT_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e4m3": 1, "f8e3m4": 1,
}  # fmt: skip
_ARRAY = re.compile(r"([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # result type, e.g. "f32[64,32]{1,0}" or a tuple "(s32[], f32[2]{0})"
    opcode: str
    operands: list[str]
    attrs: str  # everything after the operand list
    root: bool = False
    args: str = ""  # the raw text inside the parentheses (a parameter's index, a constant's value)

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    def attr_computations(self, key: str) -> list[str]:
        """Computations named by `key=%c` or `key={%a, %b}`."""
        m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%[\w.\-]+)", self.attrs)
        return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []

    @property
    def trip_count(self) -> int | None:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', self.attrs)
        return int(m.group(1)) if m else None

    @property
    def body(self) -> str:
        return self.attr_computations("body")[0]


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]
    by_name: dict[str, Instruction]

    @property
    def root(self) -> Instruction:
        return next((i for i in self.instructions if i.root), self.instructions[-1])


@dataclasses.dataclass
class Module:
    computations: dict[str, Computation]
    entry: str
    num_partitions: int


def array_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(element type, dims)] of every array in a (possibly tuple) HLO type."""
    shape = re.sub(r"/\*.*?\*/", "", shape)
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape) if t in ELEMENT_BYTES]


def shape_bytes(shape: str) -> float:
    total = 0.0
    for dtype, dims in array_shapes(shape):
        n = 1
        for d in dims:
            n *= d
        total += n * ELEMENT_BYTES[dtype]
    return total


def _matching(text: str, start: int) -> int:
    """Index just past the bracket closing the one at `start`."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c in pairs:
            depth += 1
        elif c in pairs.values():
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def _instruction(line: str) -> Instruction | None:
    m = re.match(r"\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = _matching(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[op.end() : end - 1])
    args = rest[op.end() : end - 1]
    return Instruction(m.group(2), shape, op.group(1), operands, rest[end:], root=bool(m.group(1)), args=args)


def parse(text: str) -> Module:
    """The computations of a compiled module's text (`compiled.as_text()`)."""
    computations: dict[str, Computation] = {}
    entry, current = "", None
    m = re.search(r"num_partitions=(\d+)", text)
    partitions = int(m.group(1)) if m else 1
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and current is None:
            current = Computation(header.group(2), [], {})
            if header.group(1):
                entry = current.name
            continue
        if current is None:
            continue
        if line.startswith("}"):
            computations[current.name] = current
            current = None
            continue
        ins = _instruction(line)
        if ins is not None:
            current.instructions.append(ins)
            current.by_name[ins.name] = ins
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(computations, entry, partitions)


def decode_loops(module: Module) -> list[Instruction]:
    """The while loops without a known trip count (the sampler's early-exit decode loop), anywhere in the module."""
    return [
        i for c in module.computations.values() for i in c.instructions if i.opcode == "while" and i.trip_count is None
    ]
