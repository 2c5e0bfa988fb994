"""Collectives in a compiled program's HLO text, with the bytes they move per execution.

A collective inside a while loop (the layer scan, gradient accumulation) runs once per
iteration. JAX's loops count an index up from 0 while it is less than a constant, which the
loop's condition computation compares with (or the compiler records the count in the loop's
backend config); a computation runs as often as its callers, times their trip counts.
"""

from __future__ import annotations

import collections
import re

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([\w\-]+)\(")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONSTANT = re.compile(r"%?([\w.\-]+) = [su](?:32|64)\[\]\S* constant\((\d+)\)")
_DCN_TYPE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_LESS_THAN = re.compile(r"ROOT .* compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT")
_ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f(?:16|32|64)|f8\w*)\[([\d,]*)\]")


def _bits(dtype: str) -> int:
  if dtype == "pred" or dtype.startswith("f8"):
    return 8
  return int(dtype.lstrip("bfsu"))


def _bytes(shape_text: str) -> int:
  """Bytes of the arrays in an HLO result type, e.g. `(bf16[8,128]{1,0}, f32[4])`."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    total += int(np.prod([int(d) for d in dims.split(",") if d])) * _bits(dtype) // 8
  return total


def _computations(hlo: str) -> dict[str, list[str]]:
  computations, current = {}, None
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = computations.setdefault(match.group(1), [])
    elif line.strip() == "}":
      current = None
    elif current is not None:
      current.append(line)
  return computations


def _entry(hlo: str) -> str:
  match = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M)
  if match is None:
    raise ValueError("HLO text without an ENTRY computation")
  return match.group(1)


def _trip_count(line: str, computations: dict[str, list[str]]) -> int:
  """Iterations of the while loop on `line`; ValueError if the HLO does not say."""
  known = _KNOWN_TRIP_COUNT.search(line)
  if known:
    return int(known.group(1))
  condition = computations[_CONDITION.search(line).group(1)]
  constants = dict(m.groups() for m in map(_CONSTANT.search, condition) if m)
  for cond_line in condition:
    bound = _LESS_THAN.search(cond_line)
    if bound and bound.group(1) in constants:
      return int(constants[bound.group(1)])
  raise ValueError(f"no trip count for the loop of {line.strip()[:120]}...")


def execution_counts(hlo: str) -> dict[str, int]:
  """How often each computation runs per execution of the module."""
  computations = _computations(hlo)
  counts: dict[str, int] = collections.defaultdict(int)

  def visit(name: str, times: int) -> None:
    counts[name] += times
    for line in computations.get(name, ()):
      callees = _CALLEE.findall(line)
      for branches in _BRANCHES.findall(line):
        callees += [b.strip().lstrip("%") for b in branches.split(",")]
      body = _BODY.search(line)
      for callee in callees:
        loop = body is not None and callee == body.group(1)
        visit(callee, times * (_trip_count(line, computations) if loop else 1))

  visit(_entry(hlo), 1)
  return dict(counts)


def collective_bytes(hlo: str) -> dict[str, int]:
  """Bytes each kind of collective (KINDS) produces per execution, summed over its calls.

  An async collective counts once, at its start, whose type lists the operands, the results
  (counted) and scalar context. The TPU compiler writes a reduce-scatter
  as an all-reduce fused with a slice, in a computation it names for that: counted as one.
  """
  counts = execution_counts(hlo)
  totals = dict.fromkeys(KINDS, 0)
  for name, lines in _computations(hlo).items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match is None:
        continue
      shape, op = match.groups()
      kind = op.removesuffix("-start")
      if kind not in KINDS or op.endswith("-done"):
        continue
      if op.endswith("-start"):  # (operands..., results..., scalar context...).
        arrays = [(d, s) for d, s in _ARRAY.findall(shape) if s]
        shape = " ".join(f"{d}[{s}]" for d, s in arrays[len(arrays) // 2 :])
      if kind == "all-reduce" and "reduce-scatter" in name:
        kind = "reduce-scatter"
      totals[kind] += _bytes(shape) * counts.get(name, 0)
  return totals


def mosaic_calls(hlo: str) -> int:
  """Pallas TPU kernels compiled as Mosaic (an interpreted kernel leaves none): the custom calls
  in the program's text (a scanned body's once)."""
  return hlo.count('custom_call_target="tpu_custom_call"')


def cross_slice_bytes(hlo: str) -> dict[str, int]:
  """Bytes this chip sends to other slices per execution, by transfer type (ALL_REDUCE, ...):
  on a multislice target the compiler writes each collective over the data-center network as
  host transfers that the Megascale runtime carries out."""
  counts = execution_counts(hlo)
  totals: dict[str, int] = collections.defaultdict(int)
  for name, lines in _computations(hlo).items():
    for line in lines:
      match, kind = _INSTRUCTION.match(line), _DCN_TYPE.search(line)
      if match and kind and match.group(2) == "send":
        arrays = [(d, s) for d, s in _ARRAY.findall(match.group(1)) if s]  # Payload, not u32[].
        payload = " ".join(f"{d}[{s}]" for d, s in arrays[:1])
        totals[kind.group(1)] += _bytes(payload) * counts.get(name, 0)
  return dict(totals)
