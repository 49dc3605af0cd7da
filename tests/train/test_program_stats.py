"""The HLO reading of jaxflip.train.program_stats on a hand-written module: tuples with index
comments, fused computations left out, copies in loop bodies told apart."""

from jaxflip.train.program_stats import flip_kernel_count, hlo_op_summary, instruction_opcodes, type_bytes

HLO = """HloModule step

%fused_computation (param_0: f32[4,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %negate.1 = f32[4,8]{1,0} negate(%param_0)
}

%body (carry: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %carry = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%carry), index=1
  %copy.1 = f32[4,8]{1,0} copy(%x)
  %i = s32[] get-tuple-element(%carry), index=0
  ROOT %tuple.1 = (s32[], f32[4,8]{1,0}) tuple(%i, %copy.1)
}

%cond (carry.1: (s32[], f32[4,8])) -> pred[] {
  %carry.1 = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %constant.1 = pred[] constant(false)
}

ENTRY %main (a: f32[4,8]) -> (s32[], f32[4,8], bf16[2], bf16[2], bf16[2], bf16[2]) {
  %a = f32[4,8]{1,0} parameter(0)
  %fusion.1 = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation
  %copy.2 = bf16[16,16]{1,0} copy(%fusion.1)
  %w = (s32[], f32[4,8]{1,0}, bf16[2]{0}, bf16[2]{0}, bf16[2]{0}, /*index=5*/bf16[2]{0}) while(%t), condition=%cond, body=%body
  %k = f32[4,8]{1,0} custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", backend_config={"name":"jaxflip_random_bitflip"}
  ROOT %r = (s32[], f32[4,8]{1,0}) tuple(%w, %k)
}
"""


def test_hlo_op_summary():
    summary = hlo_op_summary(HLO)
    assert "negate" not in summary["ops"]  # inside the fusion
    assert summary["ops"]["while"] == 1 and summary["ops"]["copy"] == 2 and summary["ops"]["fusion"] == 1
    assert summary["copy_bytes"] == 4 * 32 + 2 * 256
    assert summary["loop_copy_bytes"] == 4 * 32
    assert summary["largest_copies"][0] == {"computation": "ENTRY", "bytes": 512, "type": "bf16[16,16]",
                                            "in_loop_body": False}
    assert instruction_opcodes(HLO)["w"] == "while"
    assert flip_kernel_count(HLO) == 1
    assert type_bytes("(s32[], bf16[2,3]{1,0})") == 4 + 12
