"""Where a training step's time goes: the top XLA ops per model, with shape and source (CPU profiles).

For each of ByteLM, MegaByte and BLT at the training shapes of ``benchmarks/vs_pytorch.py`` (its config builders,
batch sizes and batches: ByteLM ``small``, MegaByte dims (512, 256) / depths (6, 4) with 8 heads in both stacks
(the ``small`` preset's local stack has 6 layers of 4 heads), BLT ``small`` fed space patches), this builds the
jitted AdamW train step (``make_train_step`` over ``init_train_state``), compiles it once,
times ``--steps`` untraced steps, then traces ``--steps`` more with ``jax.profiler.trace`` and reads the trace
(``jax.profiler.ProfileData``). Op time is the sum of the XLA CPU runtime's op events (lines ``tf_XLAEigen*``, its
thread pool, and ``tf_XLAExecute*``, where small programs run inline), each event counted by its self time; the
executor's own events (``ThunkExecutor*``, ``Slinky*``, ``ThreadpoolListener*``, ``end: ...``) and control flow
(``while``, ``conditional``, ``call``: their bodies' ops are counted instead) are left out. Op time is summed over
threads, so it can exceed the step's wall time on several cores.

Each op name of the trace (``ynn_fusion.12``, ``copy_bitcast_fusion.3``) is an instruction of the compiled HLO
(``compile().as_text()``); its label comes from that instruction's metadata: the pass (forward / backward under
``jvp`` / ``transpose(jvp)``, else outside grad: optimizer and metrics), the JAX primitive path (``op_name``,
condensed), and the innermost Python frames (``stack_frame_id``). A fusion is labelled by its dot if it has one.

    python benchmarks/profile_ops.py                                   # all three models, 1024 bytes, 3 steps
    python benchmarks/profile_ops.py --models blt --top 5 --label "after bucketed patches"
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS_profile.md")
MODELS = ("bytelm", "megabyte", "blt")
MODEL_TITLES = {"bytelm": "ByteLM", "megabyte": "MegaByte", "blt": "BLT"}

# Trace lines of the XLA CPU runtime that carry op events, and the runtime's own events on them.
OP_LINE_PREFIXES = ("tf_XLAEigen", "tf_XLAExecute")
RUNTIME_EVENT_PREFIXES = ("ThunkExecutor", "Slinky", "ThreadpoolListener", "end: ")
# Instructions whose events enclose other instructions' events (their bodies run as ops of their own).
CONTAINER_OPCODES = frozenset({"while", "conditional", "call"})

MATMUL_OPCODES = frozenset({"dot", "convolution"})
MOVEMENT_OPCODES = frozenset({
    "copy", "transpose", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "reshape",
    "broadcast", "gather", "scatter", "reverse", "bitcast", "iota", "copy-start", "copy-done"})
REDUCTION_OPCODES = frozenset({"reduce", "reduce-window", "select-and-scatter", "sort"})
# Instructions that carry no work of their own inside a fusion.
PLUMBING_OPCODES = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast"})
# Movement that rides along in almost every elementwise fusion (scalars and constants broadcast, views).
LIGHT_MOVEMENT_OPCODES = frozenset({"broadcast", "iota", "bitcast", "reshape"})
CATEGORIES = ("matmul", "reduction", "data movement", "elementwise + data movement", "elementwise", "other")


class ProfileUnavailable(RuntimeError):
  """The profiler cannot give per-op times here (no ProfileData, no trace file, or no CPU op events)."""


# --- Compiled HLO text -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HloInstruction:
  name: str
  opcode: str
  shape: str  # without layouts, e.g. f32[2,1024,256]
  operands: tuple[str, ...]
  calls: tuple[str, ...]  # computations run as part of this instruction (fusion bodies, loop bodies, ...)
  op_name: str  # metadata op_name ('' when none)
  stack_frame_id: int  # 0 when none
  computation: str


@dataclasses.dataclass
class HloModuleText:
  instructions: dict[str, HloInstruction]
  computations: dict[str, list[str]]  # computation -> its instruction names, in order (ROOT last)
  roots: dict[str, str]
  frames: dict[int, tuple[str, str, int, int]]  # stack frame id -> (file, function, line, parent frame id or 0)


_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([^\s=]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([^\s(]+) .*\{\s*$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLED = re.compile(r"\b(?:calls|body|condition|to_apply|branch_computations|true_computation|"
                     r"false_computation)=(\{[^}]*\}|%[\w.\-]+)")
_OP_NAME = re.compile(r'\bop_name="((?:[^"\\]|\\.)*)"')
_STACK_FRAME = re.compile(r"\bstack_frame_id=(\d+)")
_LAYOUT = re.compile(r"\{[^{}]*\}|/\*[^*]*\*/")


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at ``text[start]``."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "(":
      depth += 1
    elif text[i] == ")":
      depth -= 1
      if depth == 0:
        return i
  return len(text) - 1


def _parse_instruction(line: str, computation: str) -> tuple[HloInstruction, bool] | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  is_root, name, rest = bool(match.group(1)), match.group(2), match.group(3)
  if rest.startswith("("):  # a tuple shape
    end = _closing(rest, 0) + 1
  else:
    end = rest.find(" ")
    end = len(rest) if end == -1 else end
  shape = re.sub(r"\s+", " ", _LAYOUT.sub("", rest[:end])).replace(" ,", ",").strip()
  tail = rest[end:].lstrip()
  opcode_match = re.match(r"([\w\-]+)\(", tail)
  if not opcode_match:
    return None
  open_at = opcode_match.end() - 1
  close_at = _closing(tail, open_at)
  operands = tuple(_OPERAND.findall(tail[open_at:close_at]))
  attributes = tail[close_at + 1:]
  calls = tuple(n for group in _CALLED.findall(attributes) for n in _OPERAND.findall(group))
  metadata = attributes[attributes.find("metadata={"):] if "metadata={" in attributes else ""
  op_name = _OP_NAME.search(metadata)
  frame = _STACK_FRAME.search(metadata)
  return HloInstruction(name=name, opcode=opcode_match.group(1), shape=shape, operands=operands, calls=calls,
                        op_name=op_name.group(1) if op_name else "", stack_frame_id=int(frame.group(1)) if frame else 0,
                        computation=computation), is_root


def _parse_frames(text: str) -> dict[int, tuple[str, str, int, int]]:
  """The module's stack-frame tables (FileNames, FunctionNames, FileLocations, StackFrames)."""
  tables: dict[str, dict[int, str]] = {}
  current = None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
    elif current is not None and re.match(r"^\d+ ", line):
      index, value = line.split(" ", 1)
      current[int(index)] = value
    elif current is not None and (not line.strip() or line.startswith(("%", "ENTRY"))):
      current = None

  def fields(value: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", value)}

  files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
  functions = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
  locations = {k: fields(v) for k, v in tables.get("FileLocations", {}).items()}
  frames = {}
  for index, value in tables.get("StackFrames", {}).items():
    frame = fields(value)
    location = locations.get(frame.get("file_location_id", 0), {})
    # The text prints a frame's parent as its id + 1 (1 = no parent): frame k's caller is frame parent_frame_id - 1.
    frames[index] = (files.get(location.get("file_name_id", 0), "?"),
                     functions.get(location.get("function_name_id", 0), "?"), location.get("line", 0),
                     max(frame.get("parent_frame_id", 1) - 1, 0))
  return frames


def parse_hlo(text: str) -> HloModuleText:
  """Instructions, computations and stack frames of an HLO module's text (``compiled.as_text()``)."""
  module = HloModuleText(instructions={}, computations={}, roots={}, frames=_parse_frames(text))
  computation = None
  for line in text.splitlines():
    if computation is None:
      match = _COMPUTATION.match(line)
      if match and " = " not in line.split("{")[0]:
        computation = match.group(1)
        module.computations[computation] = []
      continue
    if line.strip() == "}":
      computation = None
      continue
    parsed = _parse_instruction(line, computation)
    if parsed:
      instruction, is_root = parsed
      module.instructions[instruction.name] = instruction
      module.computations[computation].append(instruction.name)
      if is_root:
        module.roots[computation] = instruction.name
  return module


def _body(module: HloModuleText, instruction: HloInstruction) -> list[HloInstruction]:
  """The instructions a fusion (or other calling instruction) runs, nested fusions included."""
  seen, out, pending = set(), [], list(instruction.calls)
  while pending:
    computation = pending.pop()
    if computation in seen or computation not in module.computations:
      continue
    seen.add(computation)
    for name in module.computations[computation]:
      inner = module.instructions[name]
      out.append(inner)
      if inner.opcode == "fusion":
        pending.extend(inner.calls)
  return out


def category(module: HloModuleText, name: str) -> str:
  """What an op does: matmul (a dot or convolution, fused or not), reduction, data movement (copies, transposes,
  slices, broadcasts, gathers and scatters only), elementwise + data movement (arithmetic fused with a copy,
  transpose, slice, ...), elementwise, or other."""
  instruction = module.instructions.get(name)
  if instruction is None:
    return "other"
  opcodes = {instruction.opcode} if instruction.opcode != "fusion" else {
      i.opcode for i in _body(module, instruction)} - PLUMBING_OPCODES
  if opcodes & MATMUL_OPCODES:
    return "matmul"
  if opcodes & REDUCTION_OPCODES:
    return "reduction"
  if opcodes and opcodes <= MOVEMENT_OPCODES:
    return "data movement"
  if not opcodes or instruction.opcode in ("custom-call", "rng", "rng-bit-generator", "infeed", "outfeed",
                                           "all-reduce"):
    return "other"
  if opcodes & (MOVEMENT_OPCODES - LIGHT_MOVEMENT_OPCODES):
    return "elementwise + data movement"
  return "elementwise"


def representative(module: HloModuleText, name: str) -> HloInstruction | None:
  """The instruction whose metadata best says what an op is: a fusion's dot, else the op's own metadata (a fusion's
  is its root's), else the first fused instruction that has any."""
  instruction = module.instructions.get(name)
  if instruction is None or instruction.opcode != "fusion":
    return instruction
  body = _body(module, instruction)
  for inner in body:
    if inner.opcode in MATMUL_OPCODES and inner.op_name:
      return inner
  if instruction.op_name:
    return instruction
  return next((inner for inner in body if inner.op_name), instruction)


def pass_of(op_name: str) -> str:
  """``backward`` (under ``transpose(jvp(...))``), ``forward`` (under ``jvp``), else ``outside grad`` (outside the
  gradient: in a train step, the optimizer and metrics)."""
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "outside grad"


# Path segments of an op_name that name a transformation or the step itself, not what the op computes.
_NOISE_SEGMENTS = re.compile(r"^(?:jvp\(.*\)|transpose\(.*\)|while|body|cond|eval_jaxpr|"
                             r"checkpoint|remat|rematted_computation|vmap\(.*\)|pjit)$")


def condense(op_name: str) -> str:
  """A short readable path of an op_name: ``jit(train_step)/transpose(jvp())/while/body/eval_jaxpr/jit(silu)/mul``
  becomes ``silu/mul`` (the pass is said separately, see :func:`pass_of`)."""
  first = next((part for part in op_name.split(";") if part.strip()), "")
  segments = []
  path = _split_path(first)
  if path and path[0].startswith("jit("):  # the jitted program itself (jit(train_step)): every op is inside it
    path = path[1:]
  for segment in path:
    if _NOISE_SEGMENTS.match(segment):
      continue
    segment = re.sub(r"^jit\((.*)\)$", r"\1", segment)
    if not segments or segments[-1] != segment:
      segments.append(segment)
  return "/".join(segments) or first


def _split_path(op_name: str) -> list[str]:
  """``op_name`` split at the slashes that are not inside parentheses."""
  parts, depth, current = [], 0, []
  for char in op_name:
    if char == "/" and depth == 0:
      parts.append("".join(current))
      current = []
      continue
    depth += (char == "(") - (char == ")")
    current.append(char)
  parts.append("".join(current))
  return [part for part in parts if part]


def _short_path(path: str) -> str:
  if "site-packages/" in path:
    return path.split("site-packages/", 1)[1]
  if path.startswith(ROOT + os.sep):
    return os.path.relpath(path, ROOT)
  return os.path.basename(path)


def frames_label(module: HloModuleText, stack_frame_id: int, depth: int = 2) -> str:
  """The innermost ``depth`` Python frames of an instruction, caller first: ``SwiGLU.__call__ > dense
  (bytescale/nn/layers.py:37)``."""
  chain, seen, frame_id = [], set(), stack_frame_id
  while frame_id in module.frames and frame_id not in seen and len(chain) < depth:
    seen.add(frame_id)
    path, function, line, parent = module.frames[frame_id]
    chain.append((path, function.replace(".<locals>.", "."), line))
    frame_id = parent
  if not chain:
    return ""
  path, _, line = chain[0]
  return " > ".join(function for _, function, _ in reversed(chain)) + f" ({_short_path(path)}:{line})"


def shape_label(module: HloModuleText, name: str) -> str:
  """The op's result shape; for a matmul, also its operands' shapes."""
  instruction = module.instructions.get(name)
  if instruction is None:
    return ""
  shown = representative(module, name)
  if shown is not None and shown.opcode in MATMUL_OPCODES:
    operands = [module.instructions[o].shape for o in shown.operands if o in module.instructions]
    if len(operands) == 2:
      return f"{instruction.shape} = {operands[0]} x {operands[1]}"
  return instruction.shape


def source(module: HloModuleText, name: str) -> str:
  """The pass and innermost Python frames of an op: ``backward: SwiGLU.__call__ > dense (bytescale/nn/layers.py:37)``
  (what :func:`describe` says without the primitive)."""
  shown = representative(module, name)
  if shown is None or not shown.op_name:
    return "(no metadata: made by the compiler)"
  return f"{pass_of(shown.op_name)}: {frames_label(module, shown.stack_frame_id) or condense(shown.op_name)}"


def describe(module: HloModuleText, name: str) -> str:
  """A readable label of a traced op name: ``backward: silu/mul; SwiGLU.__call__ > silu (nn/layers.py:60)``."""
  shown = representative(module, name)
  if shown is None:
    return "(not an instruction of the compiled HLO)"
  if not shown.op_name:
    opcode = shown.opcode
    if opcode == "fusion" and shown.calls and shown.calls[0] in module.roots:
      opcode = module.instructions[module.roots[shown.calls[0]]].opcode
    return f"{opcode} (no metadata: made by the compiler)"
  where = frames_label(module, shown.stack_frame_id)
  return f"{pass_of(shown.op_name)}: {condense(shown.op_name)}" + (f"; {where}" if where else "")


def op_kind(name: str) -> str:
  """The op's name without its instance number: ``copy_bitcast_fusion.12`` -> ``copy_bitcast_fusion``."""
  return re.sub(r"\.\d+$", "", name)


# --- Trace ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TraceEvent:
  line: str
  name: str
  start_ns: float
  duration_ns: float


def profile_data_class():
  """``jax.profiler.ProfileData``, or ProfileUnavailable saying why not."""
  import jax

  profile_data = getattr(jax.profiler, "ProfileData", None)
  if profile_data is None:
    raise ProfileUnavailable(f"jax.profiler.ProfileData is not available in jax {jax.__version__}: this benchmark "
                             "reads per-op times from the trace with it; use a jax release that has it")
  return profile_data


def read_trace(path: str) -> list[TraceEvent]:
  """Every event on the XLA CPU runtime's op lines of an ``.xplane.pb`` trace."""
  data = profile_data_class().from_file(path)
  events = []
  for plane in data.planes:
    for line in plane.lines:
      if line.name.startswith(OP_LINE_PREFIXES):
        events.extend(TraceEvent(line.name, e.name, float(e.start_ns), float(e.duration_ns)) for e in line.events)
  return events


def op_times(events: list[TraceEvent], module: HloModuleText | None = None) -> tuple[collections.Counter,
                                                                                      collections.Counter]:
  """``(self time in ns, event count)`` per op name. Runtime events and control-flow containers are left out; an op
  event nested in another on the same line counts towards the inner one only."""
  by_line = collections.defaultdict(list)
  for event in events:
    if event.name.startswith(RUNTIME_EVENT_PREFIXES):
      continue
    instruction = module.instructions.get(event.name) if module else None
    if instruction is not None and instruction.opcode in CONTAINER_OPCODES:
      continue
    by_line[event.line].append(event)
  times, counts = collections.Counter(), collections.Counter()
  for line_events in by_line.values():
    line_events.sort(key=lambda e: (e.start_ns, -e.duration_ns))
    open_events = []  # (end, name) of the enclosing events
    for event in line_events:
      while open_events and open_events[-1][0] <= event.start_ns:
        open_events.pop()
      if open_events:
        times[open_events[-1][1]] -= event.duration_ns
      times[event.name] += event.duration_ns
      counts[event.name] += 1
      open_events.append((event.start_ns + event.duration_ns, event.name))
  return times, counts


def trace_calls(run_once, steps: int) -> tuple[list[TraceEvent], list[float]]:
  """Runs ``run_once()`` (which must block until done) ``steps`` times under ``jax.profiler.trace``: the op events
  and the wall seconds of each call."""
  import jax

  profile_data_class()  # fail before running anything
  seconds = []
  with tempfile.TemporaryDirectory(prefix="profile_ops-") as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        start = time.perf_counter()
        run_once()
        seconds.append(time.perf_counter() - start)
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
      raise ProfileUnavailable(f"jax.profiler.trace wrote no .xplane.pb under {trace_dir}")
    events = [e for path in files for e in read_trace(path)]
  if not any(not e.name.startswith(RUNTIME_EVENT_PREFIXES) for e in events):
    raise ProfileUnavailable(
        f"the trace has no XLA CPU op events (lines {', '.join(p + '*' for p in OP_LINE_PREFIXES)}) on backend "
        f"{jax.default_backend()!r}: this benchmark reads the CPU runtime's op events only; run it with "
        "JAX_PLATFORMS=cpu")
  return events, seconds


@dataclasses.dataclass(frozen=True)
class OpRow:
  name: str
  ns_per_step: float
  calls_per_step: float
  share: float
  shape: str
  label: str
  source: str  # pass and innermost frames, without the primitive
  category: str


def summarise(times: collections.Counter, counts: collections.Counter, module: HloModuleText,
              steps: int) -> list[OpRow]:
  """One row per op, most time first."""
  total = sum(times.values()) or 1.0
  return [OpRow(name=name, ns_per_step=ns / steps, calls_per_step=counts[name] / steps, share=ns / total,
                shape=shape_label(module, name), label=describe(module, name), source=source(module, name),
                category=category(module, name))
          for name, ns in times.most_common()]


def by_category(rows: list[OpRow]) -> dict[str, float]:
  """Share of op time per category, in CATEGORIES order (absent ones left out)."""
  shares = collections.Counter()
  for row in rows:
    shares[row.category] += row.share
  return {c: shares[c] for c in CATEGORIES if shares[c] > 0}


def by_kind(rows: list[OpRow]) -> list[tuple[str, float]]:
  """Share of op time per op name without its instance number, most first."""
  shares = collections.Counter()
  for row in rows:
    shares[op_kind(row.name)] += row.share
  return shares.most_common()


def by_source(rows: list[OpRow]) -> list[tuple[str, float]]:
  """Share of op time per source (pass and innermost Python frames), most first."""
  shares = collections.Counter()
  for row in rows:
    shares[row.source] += row.share
  return shares.most_common()


# --- Models --------------------------------------------------------------------------------------------------------

def build_step(model_name: str, seq_len: int, data_path: str):
  """The compiled AdamW train step of ``model_name`` at vs_pytorch.py's training shape for ``seq_len`` bytes per row:
  ``(compiled step, train state, batch, parameter count)``."""
  import jax
  import numpy as np
  from flax import nnx

  sys.path[:0] = [HERE, ROOT]
  import vs_pytorch

  from bytescale.configs import TrainConfig
  from bytescale.models import build_model
  from bytescale.train.state import init_train_state, make_optimizer
  from bytescale.train.step import make_train_step

  class StepShapes(vs_pytorch.JaxWorker):
    """vs_pytorch's config builders and batches (``_bytelm``, ``_megabyte``, ``_blt``, ``batch``) without its
    samplers, warm-up steps and worker protocol."""

    def __init__(self):  # not the parent's: it would build and compile everything vs_pytorch measures
      self.jax, self.np, self.nnx = jax, np, nnx
      self.model_name = model_name
      self.data = vs_pytorch.corpus_bytes(data_path)
      self.rng = np.random.default_rng(0)
      self.space_rule_checked = False

  shapes = StepShapes()
  config, loss_fn = getattr(shapes, f"_{model_name}")(seq_len)
  model = build_model(config, seed=0)
  adamw = vs_pytorch.ADAMW
  optimizer = make_optimizer(TrainConfig(steps=10**6, batch_size=1, seq_len=seq_len, learning_rate=adamw["lr"],
                                         warmup_steps=0, b1=adamw["b1"], b2=adamw["b2"],
                                         weight_decay=adamw["weight_decay"], grad_clip=adamw["clip"]))
  graphdef, state = init_train_state(model, optimizer)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  batch = shapes.batch(seq_len)
  compiled = jax.jit(make_train_step(graphdef, optimizer, loss_fn), donate_argnums=0).lower(state, batch).compile()
  return compiled, state, batch, params


def profile_model(model_name: str, seq_len: int, steps: int, data_path: str, progress) -> dict:
  import jax

  start = time.perf_counter()
  compiled, state, batch, params = build_step(model_name, seq_len, data_path)
  progress(f"{model_name}: compiled in {time.perf_counter() - start:.1f} s, {params:,} parameters")
  holder = {"state": state}

  def run_once():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  run_once()  # first run: allocations, thread pool
  untraced = []
  for _ in range(steps):
    start = time.perf_counter()
    run_once()
    untraced.append(time.perf_counter() - start)
  progress(f"{model_name}: untraced steps {', '.join(f'{s:.2f}' for s in untraced)} s; tracing {steps}")
  events, traced = trace_calls(run_once, steps)
  module = parse_hlo(compiled.as_text())
  times, counts = op_times(events, module)
  rows = summarise(times, counts, module, steps)
  progress(f"{model_name}: traced steps {', '.join(f'{s:.2f}' for s in traced)} s, {len(rows)} ops")
  return {"model": model_name, "rows_x_bytes": batch["inputs"].shape, "params": params,
          "untraced": untraced, "traced": traced, "ops": rows, "op_ns_per_step": sum(times.values()) / steps}


# --- Report --------------------------------------------------------------------------------------------------------

def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def model_section(result: dict, top: int) -> str:
  rows, (batch, seq_len) = result["ops"], result["rows_x_bytes"]
  title = MODEL_TITLES[result["model"]]
  lines = [f"### {title}, {batch} x {seq_len} bytes, {result['params']:,} parameters", "",
           f"Step {statistics.median(result['untraced']):.3f} s untraced, {statistics.median(result['traced']):.3f} s "
           f"traced (medians of {len(result['untraced'])}); op time {result['op_ns_per_step'] / 1e6:,.1f} ms per "
           f"step (summed over threads).", "",
           "| # | op | ms/step | calls/step | share of op time | shape | what it is |",
           "|---|---|---|---|---|---|---|"]
  for i, row in enumerate(rows[:top], 1):
    lines.append(f"| {i} | `{row.name}` | {row.ns_per_step / 1e6:,.1f} | {row.calls_per_step:g} | "
                 f"{100 * row.share:.1f}% | {_cell(row.shape)} | {_cell(row.label)} |")
  categories = by_category(rows)
  lines += ["", "By kind (share of op time): " + ", ".join(
      f"{name} {100 * share:.1f}%" for name, share in categories.items()) + ".",
            "By op name: " + ", ".join(f"`{name}` {100 * share:.1f}%" for name, share in by_kind(rows)[:8]) + ".",
            "By source: " + "; ".join(f"{_cell(name)} {100 * share:.1f}%" for name, share in by_source(rows)[:5])
            + "."]
  return "\n".join(lines)


def report(results: list[dict], args, machine_at_start: str, loaded: bool, load_at_start: float) -> tuple[str, str]:
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  title = f"{args.label + ', ' if args.label else ''}{stamp}" + (
      f", under load (load average {load_at_start:.2f} at start): times unreliable, shares indicative" if loaded
      else "")
  command = "python benchmarks/" + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
  from common import cpu_description

  lines = [f"`{command}`", "", f"Machine at start: {machine_at_start}.", f"Load at end: {cpu_description()}.", "",
           f"{args.steps} untraced then {args.steps} traced steps after one compile and one warm-up step; float32; "
           f"AdamW + clipping as in vs_pytorch.py. Top {args.top} ops per model by self time summed over the traced "
           "steps; \"what it is\": pass, JAX primitive path, innermost Python frames (see the script's docstring). "
           "Kinds: matmul (a dot, fused or not), reduction, data movement (copies, transposes, slices, broadcasts, "
           "gathers, scatters only), elementwise + data movement (arithmetic fused with a copy, transpose, slice), "
           "elementwise, other. Sources: pass and innermost Python frames, all ops summed.", ""]
  lines += [model_section(result, args.top) + "\n" for result in results]
  return title, "\n".join(lines).strip()


def write_results(path: str, title: str, body: str):
  from common import write_section

  if not os.path.exists(path):
    with open(path, "w") as f:
      f.write("# Where the train step's time goes: top XLA ops per model\n\nWritten by `benchmarks/profile_ops.py` "
              "(its docstring says how op times are read and labelled); one section per run, newest last.\n")
  write_section(path, title, body)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
  parser.add_argument("--steps", type=int, default=3, help="untraced and then traced steps (default 3)")
  parser.add_argument("--seq-len", type=int, default=1024, help="bytes per row: one of vs_pytorch.py's (1024, 4096)")
  parser.add_argument("--top", type=int, default=3, help="ops listed per model (default 3)")
  parser.add_argument("--label", default="", help="names the run in its section title, e.g. 'before blocked attention'")
  parser.add_argument("--data", default=None, help="corpus file (default: shared/data/tinyshakespeare.txt)")
  parser.add_argument("--out", default=RESULTS, help="results markdown file (default benchmarks/RESULTS_profile.md); "
                      "'-' prints only")
  args = parser.parse_args()
  models = tuple(m.strip() for m in args.models.split(",") if m.strip())
  unknown = sorted(set(models) - set(MODELS))
  if unknown or not models:
    parser.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
  if args.steps < 1 or args.top < 1:
    parser.error("--steps and --top: must be at least 1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax starts: the op events read are the CPU runtime's
  sys.path[:0] = [HERE, ROOT]
  import vs_pytorch
  from common import DEFAULT_CORPUS, machine

  missing = sorted(m for m in models if (m, args.seq_len) not in vs_pytorch.BATCH)
  if missing:
    parser.error(f"--seq-len: vs_pytorch.py sets no batch size for {missing} at {args.seq_len} bytes; choose "
                 f"{sorted({t for _, t in vs_pytorch.BATCH})}")
  data_path = args.data or DEFAULT_CORPUS
  if not os.path.exists(data_path):
    parser.error(f"--data: {data_path} not found; pass a corpus file")
  load_at_start, cores = os.getloadavg()[0], os.cpu_count() or 1
  machine_at_start = machine()
  begin = time.perf_counter()

  def progress(message: str):
    print(f"[profile_ops {time.perf_counter() - begin:6.0f} s] {message}", file=sys.stderr, flush=True)

  progress(f"{machine_at_start}; models {', '.join(models)}, {args.seq_len} bytes per row, {args.steps} steps")
  try:
    results = [profile_model(m, args.seq_len, args.steps, data_path, progress) for m in models]
  except ProfileUnavailable as error:
    sys.exit(f"profile_ops: {error}")
  title, body = report(results, args, machine_at_start, load_at_start > 0.5 * cores, load_at_start)
  print(f"## {title}\n\n{body}")
  if args.out != "-":
    write_results(args.out, title, body)
    progress(f"wrote {args.out}")


if __name__ == "__main__":
  main()
