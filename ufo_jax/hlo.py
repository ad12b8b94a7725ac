"""Reading what XLA compiled: cost and memory analysis, and the collectives of the HLO text.

``compiled_cost`` / ``compiled_memory`` read a compiled executable's analyses (per device);
``memory_summary`` sets them against a chip's HBM; ``collectives_from_hlo`` counts the
all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute of a compiled HLO
module per step (loops counted once per iteration); ``used_hbm_gib`` reads what a compile that
ran out of memory needed. Used by the training log (``ufo_jax.train``) and the compile report
(``ufo_jax.aot``); imports nothing of ufo_jax.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

GIB = 2.0 ** 30
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
                's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
                's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY_RE = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
_COMP_RE = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_INSTR_RE = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$')
_CALLEE_RE = re.compile(r'\b(body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)')
_BRANCHES_RE = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION_RE = re.compile(r'condition=%?([\w.\-]+)')
_INT_CONSTANT_RE = re.compile(r'=\s*[su](?:8|16|32|64)\[\]\S*\s+constant\((\d+)\)')


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
  """Iterations of a ``while``: XLA's known_trip_count, else the bound ``i < N`` of its condition
  (a scan counts from 0), else 1."""
  if t := _TRIP_RE.search(line):
    return int(t.group(1))
  if c := _CONDITION_RE.search(line):
    cond = comps.get(c.group(1), [])
    bounds = [int(m.group(1)) for ln in cond if (m := _INT_CONSTANT_RE.search(ln))]
    if len(bounds) == 1 and any('direction=LT' in ln for ln in cond):
      return bounds[0]
  return 1


def _array_bytes(shape_text: str) -> int:
  """Bytes of every array in an HLO shape (a tuple counts all its elements)."""
  total = 0.0
  for dtype, dims in _ARRAY_RE.findall(shape_text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return int(total)


def _group_size(line: str) -> int:
  """Participants per replica group of a collective (1 when not stated)."""
  if m := re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line):
    return int(m.group(2))
  if m := re.search(r'replica_groups=\{\{([0-9,]*)\}', line):
    return len([x for x in m.group(1).split(',') if x])
  return 1


def collectives_from_hlo(hlo_text: str) -> dict[str, dict[str, float]]:
  """Count and bytes per step of each collective kind in a compiled HLO module's text.

  Bytes are the full buffer of each collective: the result of an all-reduce, all-gather,
  all-to-all or collective-permute, the operand (result x group size) of a reduce-scatter. Async
  pairs count once (at ``*-start``, with the bytes of the matching ``*-done``'s result). A
  collective inside a ``while`` body counts once per iteration (XLA's ``known_trip_count``, else
  the bound of the loop condition ``i < N``: scanned layers count once per layer); in a
  computation called from several places, once per call.
  """
  comps: dict[str, list[str]] = {}
  entry = None
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP_RE.match(line)
      if m and '=' not in line.split('{')[0].split('(')[0]:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == '}':
      current = None
      continue
    comps[current].append(line)
  if entry is None:
    return {}

  # Calls between computations: how many times each runs per step.
  calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
  for comp, lines in comps.items():
    for line in lines:
      trip = _trip_count(line, comps) if ' while(' in line else 1
      for kind, callee in _CALLEE_RE.findall(line):
        if kind == 'to_apply':  # reduction lambdas
          continue
        calls[comp].append((callee, trip if kind == 'body' else 1))
      if b := _BRANCHES_RE.search(line):
        for callee in b.group(1).split(','):
          calls[comp].append((callee.strip().lstrip('%'), 1))
  runs: dict[str, int] = collections.defaultdict(int)

  def visit(comp: str, times: int, depth: int = 0) -> None:
    if depth > 64:
      return
    runs[comp] += times
    for callee, factor in calls.get(comp, ()):
      if callee in comps:
        visit(callee, times * factor, depth + 1)

  visit(entry, 1)

  # Result shapes of the *-done ops by the name of their *-start operand.
  done_shapes: dict[str, str] = {}
  for lines in comps.values():
    for line in lines:
      m = _INSTR_RE.match(line)
      if m and m.group(2).endswith('-done'):
        operand = m.group(3).split(')')[0].split(',')[0].strip().split(' ')[-1].lstrip('%')
        done_shapes[operand] = m.group(1)

  out = {k: {'count': 0, 'bytes': 0} for k in COLLECTIVES}
  for comp, lines in comps.items():
    times = runs.get(comp, 0)
    if not times:
      continue
    for line in lines:
      m = _INSTR_RE.match(line)
      if not m:
        continue
      shape, opcode = m.group(1), m.group(2)
      base = opcode[:-len('-start')] if opcode.endswith('-start') else opcode
      if base not in out or opcode.endswith('-done'):
        continue
      name = line.split('=')[0].strip().split(' ')[-1].lstrip('%')
      if opcode.endswith('-start') and name in done_shapes:
        shape = done_shapes[name]  # a start may return (operands, results, contexts)
      nbytes = _array_bytes(shape)
      if base == 'reduce-scatter':
        nbytes *= _group_size(line)
      out[base]['count'] += times
      out[base]['bytes'] += nbytes * times
  return out


def compiled_cost(compiled: Any) -> dict[str, float]:
  """FLOPs and bytes of a compiled executable (per device, as XLA reports them)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {k: float(cost[k]) for k in ('flops', 'bytes accessed') if k in cost}


def compiled_memory(compiled: Any) -> dict[str, int]:
  """Per-device memory of a compiled executable (bytes)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes')
  return {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}


def memory_summary(memory: dict[str, int], hbm_bytes: int | None) -> dict[str, Any]:
  """Per-chip bytes: arguments + temporaries + outputs - aliases, and the share of HBM (left out
  when the chip's memory is unknown, e.g. a CPU)."""
  total = (memory.get('argument_size_in_bytes', 0) + memory.get('temp_size_in_bytes', 0)
           + memory.get('output_size_in_bytes', 0) - memory.get('alias_size_in_bytes', 0))
  out = {**memory, 'total_bytes': int(total), 'total_gib': total / GIB}
  if hbm_bytes:
    out.update(hbm_gib=hbm_bytes / GIB, hbm_fraction=total / hbm_bytes, fits=total <= hbm_bytes,
               free_fraction=1.0 - total / hbm_bytes)
  return out


def first_line(message: str) -> str:
  lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
  return lines[0][:500] if lines else ''


def used_hbm_gib(message: str) -> float | None:
  """The HBM a failed compile wanted, from XLA's "Used 20.5G of 15.75G hbm" or "memory required
  for HLO temporaries (20.51G) exceeds available HBM (15.75G)" (None if neither)."""
  m = (re.search(r'Used\s+([0-9.]+)([KMGT])\s+of\s+[0-9.]+[KMGT]\s+hbm', message)
       or re.search(r'required for [^(]*\(([0-9.]+)([KMGT])\) exceeds', message))
  if not m:
    return None
  scale = {'K': 2.0 ** -20, 'M': 2.0 ** -10, 'G': 1.0, 'T': 1024.0}
  return float(m.group(1)) * scale[m.group(2)]
