"""benchmarks/profile_ops.py: HLO parsing and labelling against a hand-written module, op times from hand-made
trace events, and one live trace of a tiny program whose top op is known (a matmul)."""

import importlib.util
import os
import re
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location("profile_ops", os.path.join(ROOT, "benchmarks", "profile_ops.py"))
profile_ops = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("profile_ops", profile_ops)  # dataclasses look their module up there
_SPEC.loader.exec_module(profile_ops)

# Frames: dense (model.py:12) called from Model.__call__ (model.py:20); the text prints a parent as its id + 1.
# Long instruction lines are cut with a backslash (a line continuation: the string has them whole).
HLO = """HloModule jit_train_step, entry_computation_layout={(f32[8,4]{1,0}, f32[4,16]{1,0})->(f32[16,8]{1,0}, f32[])}

FileNames
1 "/src/project/model.py"

FunctionNames
1 "Model.__call__"
2 "Model.__call__.<locals>.dense"

FileLocations
1 {file_name_id=1 function_name_id=1 line=20 end_line=20 column=1 end_column=9}
2 {file_name_id=1 function_name_id=2 line=12 end_line=12 column=1 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}


%fused_dot (param_0: f32[8,4], param_1: f32[4,16]) -> f32[8,16] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %param_1 = f32[4,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0},\
 metadata={op_name="jit(train_step)/transpose(jvp())/while/body/eval_jaxpr/bd,df->bf/dot_general" stack_frame_id=2}
}

%fused_copy (param_0.1: f32[8,16]) -> f32[16,8] {
  %param_0.1 = f32[8,16]{1,0} parameter(0)
  %transpose.1 = f32[16,8]{0,1} transpose(%param_0.1), dimensions={1,0}
  ROOT %copy.1 = f32[16,8]{1,0} copy(%transpose.1), metadata={op_name="jit(train_step)/jvp()/transpose"}
}

%fused_scale (param_0.2: f32[8,16], param_1.2: f32[]) -> f32[8,16] {
  %param_0.2 = f32[8,16]{1,0} parameter(0)
  %param_1.2 = f32[] parameter(1)
  %broadcast.1 = f32[8,16]{1,0} broadcast(%param_1.2), dimensions={}
  ROOT %multiply.1 = f32[8,16]{1,0} multiply(%param_0.2, %broadcast.1),\
 metadata={op_name="jit(train_step)/jit(silu)/mul"}
}

%fused_update (param_0.3: f32[8,16], param_1.3: f32[1,16], param_2.3: s32[]) -> f32[8,16] {
  %param_0.3 = f32[8,16]{1,0} parameter(0)
  %param_1.3 = f32[1,16]{1,0} parameter(1)
  %add.2 = f32[1,16]{1,0} add(%param_1.3, %param_1.3)
  %param_2.3 = s32[] parameter(2)
  %constant.2 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[8,16]{1,0} dynamic-update-slice(%param_0.3, %add.2, %param_2.3, %constant.2),\
 metadata={op_name="jit(train_step)/jvp()/while/body/jit(dynamic_update_index_in_dim)/dynamic_update_slice"}
}

%region_add (x.1: f32[], y.1: f32[]) -> f32[] {
  %x.1 = f32[] parameter(0)
  %y.1 = f32[] parameter(1)
  ROOT %add.3 = f32[] add(%x.1, %y.1)
}

%fused_sum (param_0.4: f32[8,16]) -> f32[] {
  %param_0.4 = f32[8,16]{1,0} parameter(0)
  %constant.4 = f32[] constant(0)
  ROOT %reduce.1 = f32[] reduce(%param_0.4, %constant.4), dimensions={0,1}, to_apply=%region_add,\
 metadata={op_name="jit(train_step)/reduce_sum"}
}

%wrapped_zeros_computation (param_0.5: f32[]) -> f32[8,16] {
  %param_0.5 = f32[] parameter(0)
  ROOT %broadcast.5 = f32[8,16]{1,0} broadcast(%param_0.5), dimensions={}
}

%body (state.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %state.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  %x.2 = f32[8,16]{1,0} get-tuple-element(%state.1), index=1
  %constant.6 = f32[] constant(2)
  %scale_fusion = f32[8,16]{1,0} fusion(%x.2, %constant.6), kind=kLoop, calls=%fused_scale,\
 metadata={op_name="jit(train_step)/jit(silu)/mul"}
  ROOT %tuple.3 = (s32[], f32[8,16]{1,0}) tuple(%i.1, %scale_fusion)
}

%cond (state.2: (s32[], f32[8,16])) -> pred[] {
  %state.2 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%state.2), index=0
  %constant.7 = s32[] constant(4)
  ROOT %compare.1 = pred[] compare(%i.2, %constant.7), direction=LT
}

ENTRY %main.9 (a.1: f32[8,4], b.1: f32[4,16]) -> (f32[16,8], f32[]) {
  %a.1 = f32[8,4]{1,0} parameter(0), metadata={op_name="a"}
  %b.1 = f32[4,16]{1,0} parameter(1), metadata={op_name="b"}
  %ynn_fusion.3 = f32[8,16]{1,0} fusion(%a.1, %b.1), kind=kCustom, calls=%fused_dot,\
 metadata={op_name="jit(train_step)/transpose(jvp())/while/body/eval_jaxpr/reduce_sum" stack_frame_id=1},\
 backend_config={"fusion_config":{"kind":"__ynn_fusion"},"outer_dimension_partitions":[]}
  %constant.8 = f32[] constant(0)
  %wrapped_broadcast.2 = f32[8,16]{1,0} fusion(%constant.8), kind=kLoop, calls=%wrapped_zeros_computation
  %constant.9 = s32[] constant(0)
  %tuple.4 = (s32[], f32[8,16]{1,0}) tuple(%constant.9, %ynn_fusion.3)
  %while.1 = (s32[], /*index=1*/f32[8,16]{1,0}) while(%tuple.4), condition=%cond, body=%body,\
 metadata={op_name="jit(train_step)/jvp()/while"}
  %looped = f32[8,16]{1,0} get-tuple-element(%while.1), index=1
  %update_fusion = f32[8,16]{1,0} fusion(%looped, %b.1, %constant.9), kind=kLoop, calls=%fused_update
  %copy_transpose_fusion = f32[16,8]{1,0} fusion(%update_fusion), kind=kLoop, calls=%fused_copy,\
 metadata={op_name="jit(train_step)/jvp()/transpose"}
  %sum_fusion = f32[] fusion(%wrapped_broadcast.2), kind=kLoop, calls=%fused_sum,\
 metadata={op_name="jit(train_step)/reduce_sum"}
  ROOT %tuple.5 = (f32[16,8]{1,0}, f32[]) tuple(%copy_transpose_fusion, %sum_fusion)
}
"""


@pytest.fixture(scope="module")
def module():
  return profile_ops.parse_hlo(HLO)


def test_parse_instructions(module):
  dot = module.instructions["dot.1"]
  assert (dot.opcode, dot.shape, dot.operands, dot.computation) == ("dot", "f32[8,16]", ("param_0", "param_1"),
                                                                    "fused_dot")
  assert dot.op_name.endswith("/bd,df->bf/dot_general") and dot.stack_frame_id == 2
  loop = module.instructions["while.1"]
  assert loop.opcode == "while" and loop.shape == "(s32[], f32[8,16])" and set(loop.calls) == {"cond", "body"}
  assert module.instructions["ynn_fusion.3"].calls == ("fused_dot",)
  assert module.instructions["sum_fusion"].op_name == "jit(train_step)/reduce_sum"
  assert module.instructions["wrapped_broadcast.2"].op_name == ""
  assert module.roots["fused_copy"] == "copy.1" and module.roots["main.9"] == "tuple.5"
  assert module.computations["body"][-1] == "tuple.3"


@pytest.mark.parametrize("name, expected", [
    ("ynn_fusion.3", "matmul"),
    ("copy_transpose_fusion", "data movement"),
    ("wrapped_broadcast.2", "data movement"),
    ("scale_fusion", "elementwise"),  # its broadcast of a scalar does not make it data movement
    ("update_fusion", "elementwise + data movement"),
    ("sum_fusion", "reduction"),
    ("not_in_module.7", "other"),
])
def test_category(module, name, expected):
  assert profile_ops.category(module, name) == expected


def test_labels(module):
  # A matmul fusion is labelled by its dot (not by the fusion's own metadata, reduce_sum) and its frames.
  assert profile_ops.describe(module, "ynn_fusion.3") == (
      "backward: bd,df->bf/dot_general; Model.__call__ > Model.__call__.dense (model.py:12)")
  assert profile_ops.source(module, "ynn_fusion.3") == "backward: Model.__call__ > Model.__call__.dense (model.py:12)"
  assert profile_ops.shape_label(module, "ynn_fusion.3") == "f32[8,16] = f32[8,4] x f32[4,16]"
  assert profile_ops.describe(module, "scale_fusion") == "outside grad: silu/mul"
  assert profile_ops.describe(module, "copy_transpose_fusion") == "forward: transpose"
  assert profile_ops.describe(module, "update_fusion") == "forward: dynamic_update_index_in_dim/dynamic_update_slice"
  assert profile_ops.describe(module, "wrapped_broadcast.2") == "broadcast (no metadata: made by the compiler)"
  assert profile_ops.describe(module, "nowhere.1") == "(not an instruction of the compiled HLO)"


@pytest.mark.parametrize("op_name, expected_pass, expected", [
    ("jit(train_step)/transpose(jvp())/while/body/eval_jaxpr/jit(silu)/mul", "backward", "silu/mul"),
    ("jit(train_step)/jvp()/while/body/eval_jaxpr/bmgras,bmsgk->bmgrak/dot_general", "forward",
     "bmgras,bmsgk->bmgrak/dot_general"),
    ("jit(train_step)/transpose(jvp(jit(_take)))/broadcast_in_dim", "backward", "broadcast_in_dim"),
    ("jit(train_step)/jit(tree_bias_correction)/div", "outside grad", "tree_bias_correction/div"),
    ("jit(train_step)/mul;jit(train_step)", "outside grad", "mul"),
    ("jit(<lambda>)/dot_general", "outside grad", "dot_general"),
])
def test_condense(op_name, expected_pass, expected):
  assert profile_ops.pass_of(op_name) == expected_pass
  assert profile_ops.condense(op_name) == expected


def test_op_times_self_time_and_skips(module):
  event = profile_ops.TraceEvent
  events = [
      # line A: the executor wraps an op (skipped), the op's "end:" tail (skipped), a while loop (container, dropped)
      # around its body's op, and an unknown op with another nested inside it (self time of the outer: 100 - 30).
      event("tf_XLAEigen/1", "ThunkExecutor::Execute", 0, 1000),
      event("tf_XLAEigen/1", "ynn_fusion.3", 10, 200),
      event("tf_XLAEigen/1", "end: ynn_fusion.3", 205, 5),
      event("tf_XLAEigen/1", "while.1", 300, 400),
      event("tf_XLAEigen/1", "scale_fusion", 310, 50),
      event("tf_XLAEigen/1", "scale_fusion", 400, 60),
      event("tf_XLAEigen/1", "outer_unknown", 800, 100),
      event("tf_XLAEigen/1", "sum_fusion", 820, 30),
      # line B: the same op on another thread overlapping line A in time counts in full; runtime waits skipped.
      event("tf_XLAExecute/2", "ynn_fusion.3", 0, 150),
      event("tf_XLAExecute/2", "SlinkyThreadPool::Await", 150, 40),
      event("tf_XLAExecute/2", "ThreadpoolListener::Record", 150, 0),
  ]
  times, counts = profile_ops.op_times(events, module)
  assert dict(times) == {"ynn_fusion.3": 350, "scale_fusion": 110, "outer_unknown": 70, "sum_fusion": 30}
  assert dict(counts) == {"ynn_fusion.3": 2, "scale_fusion": 2, "outer_unknown": 1, "sum_fusion": 1}
  rows = profile_ops.summarise(times, counts, module, steps=2)
  assert [r.name for r in rows] == ["ynn_fusion.3", "scale_fusion", "outer_unknown", "sum_fusion"]
  assert rows[0].ns_per_step == 175 and rows[0].calls_per_step == 1 and rows[0].share == pytest.approx(350 / 560)
  assert profile_ops.by_category(rows) == pytest.approx(
      {"matmul": 350 / 560, "reduction": 30 / 560, "elementwise": 110 / 560, "other": 70 / 560})


def test_missing_profile_data_is_an_error(monkeypatch):
  monkeypatch.delattr(jax.profiler, "ProfileData", raising=False)
  with pytest.raises(profile_ops.ProfileUnavailable, match="ProfileData is not available"):
    profile_ops.trace_calls(lambda: None, 1)


def test_trace_without_op_events_is_an_error(monkeypatch):
  monkeypatch.setattr(profile_ops, "read_trace", lambda path: [])
  with pytest.raises(profile_ops.ProfileUnavailable, match="no XLA CPU op events"):
    profile_ops.trace_calls(lambda: jnp.ones(4).block_until_ready(), 1)


def test_live_trace_top_op_is_the_matmul():
  """A program that is one large matmul beside a small elementwise op: the traced top op must be the instruction
  whose computation holds the dot (found here from the HLO text with a regex of this test's own)."""
  matmul_then_scale = jax.jit(lambda a, b, c: (a @ b, c * 3.0))
  a, b, c = jnp.ones((384, 384)), jnp.ones((384, 384)), jnp.ones((8, 8))
  compiled = matmul_then_scale.lower(a, b, c).compile()
  text = compiled.as_text()
  jax.block_until_ready(compiled(a, b, c))
  events, seconds = profile_ops.trace_calls(lambda: jax.block_until_ready(compiled(a, b, c)), 3)
  assert len(seconds) == 3
  module = profile_ops.parse_hlo(text)
  times, counts = profile_ops.op_times(events, module)
  rows = profile_ops.summarise(times, counts, module, steps=3)
  top = rows[0]

  computations = dict(re.findall(r"^(?:ENTRY )?%(\S+) \(.*?\{\n(.*?)\n\}", text, re.S | re.M))
  callers = re.findall(r"^\s*(?:ROOT )?%(\S+) = .*? (?:dot|fusion)\(.*?(?:calls=%(\S+?),|$)", text, re.M)
  with_dot = {name for name, called in callers
              if re.search(rf"^\s*(?:ROOT )?%{re.escape(name)} = \S+ dot\(", text, re.M)
              or (called and " dot(" in computations.get(called, ""))}
  assert top.name in with_dot, (top.name, with_dot, [r.name for r in rows])
  assert top.category == "matmul" and "dot_general" in top.label
  assert top.calls_per_step == 1 and top.share > 0.5
  assert all(r.label != "(not an instruction of the compiled HLO)" for r in rows), [r.name for r in rows]
