"""The nine classes of disagreement with the reference release (issue 20), each as a hand-derived table
in both modes: ``reward.reference_compat=true`` reproduces the reference, the fixed default departs
on purpose (docs/reward.md lists every departure and its reason).

The reference is ByteDance-BandAI/CodeVision; each test names the file and function it follows:
``reward.py`` = ``recipe/codevision/reward.py``, ``uvtr.py`` = ``verl/workers/reward_manager/uvtr.py``,
``agent_loop.py`` / ``tool_agent_loop.py`` = ``verl/experimental/agent_loop/``. Weights are the
recipe's (RewardConfig defaults): w_acc 1, w_fmt 0.1, alpha 1, beta 0, exact 0.1, emerge 0.2, gamma 0.5.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from reward_testlib import call, format_payload, task, trajectory

from cv_ray.data.records import read_tasks
from cv_ray.geometry import identity
from cv_ray.reward import answer as fixed_answer
from cv_ray.reward import reference
from cv_ray.reward.config import JudgeConfig, RewardConfig
from cv_ray.reward.dense import score_group
from cv_ray.reward.format import format_reward as fixed_format
from cv_ray.reward.judge import JudgeClient
from cv_ray.reward.outcome import SampleOutcome, UsedOp, outcome_from_trajectory
from cv_ray.reward.verdicts import VerdictResolver
from cv_ray.types import ToolCallRecord

FIXED = RewardConfig()
COMPAT = RewardConfig(reference_compat=True)
GOOD = "<think>look</think><answer>red</answer>"


def traj(*calls, text: str = GOOD):
    """A trajectory on one image whose calls carry their code (compat reads it) and their sandbox ops
    (fixed reads them)."""
    return trajectory([None], [identity()] + [identity()] * len(calls), list(calls), text)


def crop_call(box, turn=0, ops_box=None, code=None):
    """A literal crop: the code says ``box``; the sandbox reports ``ops_box`` (default the same)."""
    written = code or f"result = image.crop(({', '.join(str(v) for v in box)}))"
    return call(0, [{"op": "crop", "box": list(ops_box or box)}], output_index=1, code=written, turn=turn)


def both(t, trajectories, cfg_fixed=FIXED, cfg_compat=COMPAT, correct=True):
    outcomes = [dataclasses.replace(outcome_from_trajectory(x), correct=correct) for x in trajectories]
    return score_group(t, outcomes, cfg_fixed), score_group(t, outcomes, cfg_compat)


# ------------------------------------------------------------------------------------------------------------
# 1. The answer box key


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _reference_file(path, boxes):
    rows = [{"data_source": "ref_ocr", "prompt": [{"role": "user", "content": "<image>Read it."}],
             "images": [{"bytes": _png(), "path": None}], "reward_model": {"ground_truth": "red"},
             "extra_info": {"question": "Read it.", "transform": "crop", "index": i, **box}}
            for i, box in enumerate(boxes)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return list(read_tasks(path))


def test_class1_answer_box_from_bbox_or_bbox_2d(tmp_path):
    """Follows tool_agent_loop.py ``ToolAgentLoop.run``: ``gt_bbox = ei.get("bbox", ei.get("bbox_2d"))``.

    Answer box B = [0, 0, 10, 20]; the crop [0, 0, 10, 10] has IoU 100 / 200 = 0.5 with it.
    Mutant: the reader takes only ``bbox`` (a bbox_2d row has no box: fixed counts any crop as done,
    IoU 1 -> 2.2; compat scores the crop 0 -> 0.2).
    """
    box, crop = [0.0, 0.0, 10.0, 20.0], [0, 0, 10, 10]
    (only_2d,) = _reference_file(tmp_path / "a.parquet", [{"bbox_2d": box}])
    # a file with both fields: this row's bbox is null. The reference's get("bbox", ...) finds the key
    # and returns None: no box (its crop term is then 0); the fixed reader takes bbox_2d.
    (_, null_bbox) = _reference_file(tmp_path / "b.parquet", [{"bbox": box, "bbox_2d": None},
                                                               {"bbox": None, "bbox_2d": box}])
    # E = {crop}; fixed: mandatory 0.5 -> 1 + .1 + .5 + .1 (exact: core used {crop} = E) = 1.7
    (fixed,), (compat,) = both(only_2d, [traj(crop_call(crop))])
    assert (fixed.stats["iou"], fixed.total) == (0.5, pytest.approx(1.7))
    assert (compat.stats["iou"], compat.total) == (0.5, pytest.approx(1.7))
    (fixed,), (compat,) = both(null_bbox, [traj(crop_call(crop))])
    assert fixed.total == pytest.approx(1.7)
    # compat: no box -> mandatory 0 < gate 0.1 -> acc 1 * 0 -> 0 + .1 + 0 + .1 = 0.2
    assert (compat.terms["mandatory"], compat.terms["acc"], compat.total) == (0.0, 0.0, pytest.approx(0.2))


# ------------------------------------------------------------------------------------------------------------
# 2. Crop required, no box


def test_class2_crop_required_without_a_box():
    """Follows agent_loop.py ``_mandatory_reward``: the IoU is added only ``if gt_bbox is not None``.

    Fixed departs: with no region to compare, any crop counts as done (else no sample of the task could
    ever keep its accuracy: the crop gate would zero it). Mutant: compat counts the crop as done (2.2).
    """
    t = task(required=["crop"], answer_box=None)
    (fixed,), (compat,) = both(t, [traj(crop_call([0, 0, 5, 5]))])
    assert (fixed.terms["mandatory"], fixed.terms["acc"], fixed.total) == (1.0, 1.0, pytest.approx(2.2))
    assert (compat.terms["mandatory"], compat.terms["acc"], compat.total) == (0.0, 0.0, pytest.approx(0.2))


# ------------------------------------------------------------------------------------------------------------
# 3. The format reward


@pytest.mark.parametrize("text, fixed, compat", [
    ("<think>a</think><answer>B</answer>", 1.0, 1.0),
    ("  <think>a</think>\n<answer>B</answer>\n", 1.0, 1.0),
    ("<think>a<think>b</think></think><answer>B</answer>", 0.0, 1.0),     # nested: equal counts suffice
    ("<think>a</think></think><think><answer>B</answer>", 0.0, 1.0),      # stray tags: equal counts suffice
    ("<think>a</think><answer>x <answer>B</answer>", 0.0, 1.0),           # <answer> inside the answer
    ("<think>a</think><tool_response>raw <answer>B</answer>", 0.0, 1.0),  # an unclosed tool response stays
    ("<think>x <answer>y</think> z</answer>", 0.0, 0.0),                  # the answer opens inside a think block
    ("<think><answer>B</answer></think>", 0.0, 0.0),                       # does not end with the answer
    ("<think>a</think><answer>A</answer><answer>B</answer>", 0.0, 0.0),   # two answers
    ("<think>a</think><answer>B</answer> done", 0.0, 0.0),
    ("<answer>B</answer>", 0.0, 0.0),                                      # no think block
    ("<think>a<answer>B</answer>", 0.0, 0.0),                              # unequal counts
])
def test_class3_format(text, fixed, compat):
    """Follows uvtr.py ``UVTRRewardManager._compute_format_reward`` (counts, one answer at the end, no think
    block holding it). Fixed departs: think blocks properly nested and the answer after the last one.
    Mutant: compat checks nesting (the fixed rules)."""
    assert (fixed_format(text), reference.format_reward(text)) == (fixed, compat)


# ------------------------------------------------------------------------------------------------------------
# 4. Answer extraction


@pytest.mark.parametrize("text, fixed, compat", [
    ("<think>t</think><answer> B </answer>", "B", "B"),
    ("<think>t</think><answer>B", None, "B"),                              # after the last <answer>
    ("<think>t</think>\nThe answer is B", None, "The answer is B"),       # the last line
    ("<answer>A</answer> then <answer>B", "A", "A"),                       # a closed answer comes first
    ("<answer>A</answer><tool_response>raw <answer>B</answer>", "A", "B"),  # unclosed response: ours runs to the end
    ("", None, None),
    ("x\n" * 499, None, "x"),
    ("x\n" * 500, None, None),                                             # 500 lines: the reference gives up
])
def test_class4_answer_extraction(text, fixed, compat):
    """Follows reward.py ``extract_answer``. Fixed departs: only a closed <answer> is an answer (free text
    would let the rules read a guess out of the reasoning). Mutant: compat without the fallbacks."""
    assert (fixed_answer.extract_answer(text), reference.extract_answer(text)) == (fixed, compat)


# ------------------------------------------------------------------------------------------------------------
# 5. Rule verdicts before the judge


# (answer, truth, fixed verdict for a reference row (task type general): True/False/None = judge,
#  compat rules: True, or None = the judge decides)
RULES = [
    ("a cat", "A", None, True),              # the article "a" read as choice A
    ("I think C, not D", "D", None, True),   # the last standalone A-D letter
    ("B", "C", None, None),                  # a wrong letter still goes to the judge
    ("12.0", "12", True, True),              # equal as floats
    ("there are 3 cats", "3", True, True),   # the last number
    ("0.75", "3/4", True, True),             # fractions within 1e-4
    ("3/4", "0.75", True, None),             # the last number of "3/4" is 4
    ("1/2", "0.5", True, None),
    ("50%", "0.5", True, None),
    ("STOP", "stop", True, None),            # text must match exactly (after float() fails)
    ("", "A", False, None),                  # an empty answer: no rule, still judged
]


@pytest.mark.parametrize("answer, truth, fixed, compat", RULES)
def test_class5_rules(answer, truth, fixed, compat):
    """Follows reward.py ``are_answers_equivalent`` / ``verify_answer_rule``. Fixed departs: our rules per
    task type (and math-verify), the judge only for what they cannot decide. Mutant: compat uses our rules."""
    assert fixed_answer.rule_verdict(answer, truth, "general").correct == fixed
    assert (True if reference.answers_match(answer, truth) else None) == compat


def test_class5_the_judge_is_asked_exactly_when_the_reference_asks(judge_server):
    """Follows reward.py ``compute_score``: no answer -> 0 without a judge; rules -> 1; else the judge.
    The stub judge (a real local HTTP server) says 1 when the answer contains the truth. Mutant: compat
    asks the judge only when our rules are undecided."""
    server = judge_server("ok")
    texts = [f"<think>t</think><answer>{a}</answer>" for a, *_ in RULES] + ["", "line one\nI say 12"]
    truths = [t for _, t, *_ in RULES] + ["12", "12"]
    asked, verdicts = {}, {}

    async def resolve_one_by_one(compat: bool) -> None:
        judge = JudgeClient(JudgeConfig(enabled=True, base_url=server.base_url, timeout_s=5.0, backoff_s=0.01))
        resolver = VerdictResolver(judge, math_timeout_s=1)  # a fresh cache per mode
        for text, truth in zip(texts, truths):
            before = server.requests
            (out,) = await resolver.resolve(task(answer=truth), [SampleOutcome(text)], compat)
            asked[compat].append(server.requests > before)
            verdicts[compat].append(out.correct)
        await judge.aclose()

    for compat in (False, True):
        asked[compat], verdicts[compat] = [], []
        asyncio.run(resolve_one_by_one(compat))
    assert asked[True] == [c is None for *_, c in RULES] + [False, False]
    assert verdicts[True][-1] is True  # the last line "I say 12": its last number is 12
    assert asked[False] == [f is None for _, _, f, _ in RULES] + [False, False]


# ------------------------------------------------------------------------------------------------------------
# 6. R_necessity under the crop gate


def test_class6_necessity_is_zero_when_the_crop_gate_fires():
    """Follows agent_loop.py ``_compute_tool_reward_for_sample``: ``if "crop" in E and r_mandatory < 0.1:
    r_acc *= r_mandatory; r_necessity = 0``. Fixed does the same (a right answer read from the wrong region
    shows no need for the tool). beta = 1 to see the term. Mutant: the gate leaves R_necessity (S2 1.2).

    Group: S1 crops the box (IoU 1), S2 crops elsewhere (IoU 0), both right; S3, S4 use no tool, wrong.
    Tool accuracy 2/2, tool-free 0/2 -> necessity 1 for right tool users.
    """
    cfg_fixed, cfg_compat = dataclasses.replace(FIXED, beta=1.0), dataclasses.replace(COMPAT, beta=1.0)
    t = task(required=["crop"], answer_box=[0, 0, 10, 10])
    samples = [traj(crop_call([0, 0, 10, 10])), traj(crop_call([50, 50, 60, 60])), traj(), traj()]
    outcomes = [dataclasses.replace(outcome_from_trajectory(x), correct=c)
                for x, c in zip(samples, [True, True, False, False])]
    for cfg in (cfg_fixed, cfg_compat):
        s1, s2, s3, _ = score_group(t, outcomes, cfg)
        assert s1.terms["necessity"] == 1.0 and s1.total == pytest.approx(3.2)  # 1 + .1 + 1 + 1 + .1
        assert s2.terms["necessity"] == 0.0 and s2.total == pytest.approx(0.2)  # acc 0, .1 + 0 + 0 + .1
        assert s3.total == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------------------
# 7. Malformed tool calls


def test_class7_unparsable_calls_do_not_count_in_compat():
    """Follows tool_parser.py ``HermesToolParser.extract_tool_calls`` (drops what is not a JSON object with
    name and arguments) and tool_agent_loop.py (the first parsed call of a turn is handled and counted in
    ``code_count``; agent_loop.py ``_code_usage_penalty``). Fixed departs: every attempted call costs
    (a malformed call still used a turn), every call of a turn runs.

    E = {rotate_90}. Turns: 0 malformed JSON; 1 a rotation; 2 a call with an extra key (ours refuses it,
    the reference runs it); 3 two rotations in one turn.
    Fixed: 5 calls -> usage 5 - 2 = 3; the rotations ran -> 1 + .1 + 1 + .1 - .5 * 3 = 0.7.
    Compat: code_count 3 (turns 1, 2, 3) -> usage 1; 1 + .1 + 1 + .1 - .5 = 1.7.
    Mutant: compat counts the unparsable call (usage 2, 1.2).
    """
    rotate = "result = image.rotate(90, expand=True)"
    calls = [
        ToolCallRecord(turn=0, parsed=False, parse_error_class="malformed_json", payload='{"name": "code_image_tool"'),
        call(0, [{"op": "rotate_90"}], code=rotate, turn=1),
        ToolCallRecord(turn=2, parsed=False, parse_error_class="malformed_json",
                       payload=json.dumps({"name": "code_image_tool", "arguments": {"code": "x = 1"}, "id": 1})),
        call(0, [{"op": "rotate_90"}], code=rotate, turn=3),
        call(0, [{"op": "rotate_90"}], code=rotate, turn=3),
    ]
    (fixed,), (compat,) = both(task(required=["rotate_90"]), [traj(*calls)])
    assert (fixed.stats["calls"], fixed.terms["usage"], fixed.total) == (5.0, 3.0, pytest.approx(0.7))
    assert (compat.stats["calls"], compat.terms["usage"], compat.total) == (3.0, 1.0, pytest.approx(1.7))


# ------------------------------------------------------------------------------------------------------------
# 8. A crop after a rotation inside one call

# A 200 x 100 image 0, answer box [150, 20, 190, 60]. The call rotates 90 degrees and crops [20, 10, 60, 50]
# of the rotated image: exactly the answer region (derivation in test_outcome.py). The sandbox reports the
# crop in the call's input frame (image 0 here: [150, 20, 190, 60]) and the box as written (frame_box).
ROTATE_THEN_CROP = "result = image.rotate(90, expand=True).crop((20, 10, 60, 50))"
OPS = [{"op": "rotate_90"}, {"op": "crop", "box": [150, 20, 190, 60], "frame_box": [20, 10, 60, 50]}]


def test_class8_the_box_of_a_crop_after_a_rotation_in_one_call():
    """Follows tool_use_judge.py ``_extract_crop_boxes_from_ast`` (the literal box of the code) and
    agent_loop.py ``_best_crop_iou`` (compared as is with the answer box). Fixed departs: the box in
    image 0's frame. E = {rotate_90, crop}.
    Fixed: IoU 1 -> 1 + .1 + 1 + .1 = 2.2. Compat: [20, 10, 60, 50] is disjoint from the answer box ->
    mandatory 1/2 + 0/2 = 0.5 -> 1 + .1 + .5 + .1 = 1.7.
    Mutant: compat uses the sandbox's input-frame box (2.2).
    """
    t = task(required=["rotate_90", "crop"], answer_box=[150, 20, 190, 60])
    (fixed,), (compat,) = both(t, [traj(call(0, OPS, code=ROTATE_THEN_CROP))])
    assert (fixed.stats["iou"], fixed.total) == (pytest.approx(1.0), pytest.approx(2.2))
    assert (compat.stats["iou"], compat.total) == (0.0, pytest.approx(1.7))


def test_class8_outcomes_without_call_text_use_the_frame_box():
    """An outcome built from ops alone (no call text): compat reads the ``frame_box`` the sandbox reports,
    falling back to the reported box when it is absent. Mutant: the fallback ignores frame_box."""
    t = task(required=["rotate_90", "crop"], answer_box=[150, 20, 190, 60])
    with_frame = outcome_from_trajectory(traj(call(0, OPS)))
    with_frame = dataclasses.replace(with_frame, calls=[], correct=True)
    without = dataclasses.replace(with_frame, ops=[dataclasses.replace(o, frame_box=None) for o in with_frame.ops])
    assert with_frame.ops[1].frame_box == [20.0, 10.0, 60.0, 50.0]
    assert [b.total for b in score_group(t, [with_frame, without], COMPAT)] == [pytest.approx(1.7),
                                                                                 pytest.approx(2.2)]


# ------------------------------------------------------------------------------------------------------------
# 9. float32


def test_class9_the_total_is_stored_as_float32():
    """Follows agent_loop.py ``_compute_tool_reward_for_sample`` (``torch.tensor(r_total, dtype=float32)``).
    Fixed departs: a Python float. E = {rotate_90, flip_horizontal, crop}, both turns/flips used, crop
    IoU 0.5: mandatory 2/3 + 0.5/3; exact (core used = E) -> total 1 + .1 + 5/6 + .1 = 2.0333...
    Mutant: compat keeps the float64 total."""
    t = task(required=["rotate_90", "flip_horizontal", "crop"], answer_box=[0, 0, 10, 20])
    calls = [call(0, [{"op": "rotate_90"}, {"op": "flip_horizontal"}, {"op": "crop", "box": [0, 0, 10, 10]}],
                  code="r = image.rotate(90)\nr = ImageOps.mirror(r)\nresult = r.crop((0, 0, 10, 10))")]
    (fixed,), (compat,) = both(t, [traj(*calls)])
    exact = (1.0 + 0.1 * 1.0) + (2 / 3 + 0.5 / 3 + 0.1)
    assert fixed.total == pytest.approx(exact, abs=1e-12)
    assert compat.total == float(np.float32(exact)) and compat.total != exact
    assert compat.total == pytest.approx(sum(w * compat.terms[k] for k, w in {
        "acc": 1.0, "fmt": 0.1, "mandatory": 1.0, "exact": 0.1}.items()), rel=1e-7)


# ------------------------------------------------------------------------------------------------------------
# Other departures of the fixed reward


def test_fixed_reads_executed_ops_the_code_text_cannot_show():
    """Follows tool_use_judge.py ``heuristic_parse``: a NumPy slice crop is invisible to the reference.
    Fixed departs: the sandbox traced and verified the crop. E = {crop}, box [0, 0, 10, 10].
    Fixed: IoU 1 -> 2.2. Compat: no crop read -> mandatory 0 -> acc gated to 0 -> 0.1 (format only).
    Mutant: compat reads the sandbox's ops."""
    t = task(required=["crop"], answer_box=[0, 0, 10, 10])
    slice_crop = call(0, [{"op": "crop", "box": [0, 0, 10, 10]}],
                      code="result = Image.fromarray(np.array(image)[0:10, 0:10])")
    (fixed,), (compat,) = both(t, [traj(slice_crop)])
    assert (fixed.total, compat.total) == (pytest.approx(2.2), pytest.approx(0.1))


def test_reference_transform_forms_as_the_reference_reads_them():
    """Follows agent_loop.py ``_expected_transforms``: a string is one name; ``rotate_X`` needs
    ``rotate_(360-X)``; any other name (``none``, ``""``, ``hflip``) is required as written. Fixed departs:
    our reader maps names and lists to fixes and "none"/"" to nothing (docs/data.md)."""
    assert reference.expected_ops(["rotate_90", "crop"]) == {"rotate_270", "crop"}
    assert reference.expected_ops("rotate_90") == {"rotate_270"}
    assert reference.expected_ops("rotate_90,crop") == set()        # one name, whose angle is no integer
    assert reference.expected_ops("none") == {"none"} and reference.expected_ops("") == {""}
    assert reference.expected_ops("hflip") == {"hflip"} and reference.expected_ops(None) == set()
    assert reference.expected_ops("rotate_45") == set() and reference.expected_ops({"crop": 1}) == {"crop"}


def test_compat_uses_the_rows_raw_transform():
    """A reference row whose transform is "none": the reference requires an op named "none" (never used),
    so the allowance is max(2, 1) = 2 and a rotation is spurious; fixed requires nothing. One call that
    rotates, right answer: fixed 1 + .1 - .5 * 1 (spurious) = 0.6; compat the same total, mandatory 0 of 1.
    With two rotations in two calls and E = {} vs {"none"}: identical. The difference shows with
    transform "rotate_90,crop": fixed requires [crop, rotate_270]; compat requires nothing."""
    t = dataclasses.replace(task(required=["crop", "rotate_270"], answer_box=[0, 0, 10, 10]),
                            extra={"reference": {"transform": "rotate_90,crop", "bbox": [0, 0, 10, 10]}})
    calls = [call(0, [{"op": "rotate_270"}, {"op": "crop", "box": [0, 0, 10, 10]}],
                  code="r = image.rotate(270, expand=True)\nresult = r.crop((0, 0, 10, 10))")]
    (fixed,), (compat,) = both(t, [traj(*calls)])
    # fixed: mandatory (1 + 1) / 2 = 1, exact -> 2.2; compat: E empty -> spurious 1 (rotate_270) -> 1.1 - .5 = 0.6
    assert (fixed.total, compat.total) == (pytest.approx(2.2), pytest.approx(0.6))


def test_used_op_frame_box_reaches_the_outcome():
    (op_crop,) = [o for o in outcome_from_trajectory(traj(call(0, OPS))).ops if o.name == "crop"]
    assert isinstance(op_crop, UsedOp) and (op_crop.raw_box, op_crop.frame_box) == ([150, 20, 190, 60],
                                                                                      [20, 10, 60, 50])
    assert format_payload("x = 1").startswith("\n{") and format_payload("x = 1").endswith("}\n")


def test_compat_asks_the_judge_about_ops_only_where_the_code_reads_as_none(judge_server):
    """Follows tool_use_judge.py ``ToolUseJudgeClient.analyze``: with a judge configured, the LLM is asked
    only for a call whose heuristics read no op; its answer replaces that reading. The stub judge answers
    every such question with a crop of [0, 0, 10, 10]. E = {crop}, answer box [0, 0, 10, 10].

    Call 1 rotates (read by the heuristics: not asked); call 2 crops by a NumPy slice (read as nothing:
    asked -> crop, IoU 1). Compat: mandatory 1, spurious 1 (rotate_90, no turn required) ->
    1 + .1 + 1 + 0 (exact: core used {rotate_90, crop} != {crop}) - .5 = 1.6. Fixed never asks.
    Mutant: the judge is asked about every call (2 requests).
    """
    server = judge_server("ok")
    judge = JudgeClient(JudgeConfig(enabled=True, base_url=server.base_url, timeout_s=5.0, backoff_s=0.01))
    resolver = VerdictResolver(judge, math_timeout_s=1)
    t = task(required=["crop"], answer_box=[0, 0, 10, 10], answer="red")
    calls = [call(0, [{"op": "rotate_90"}], code="result = image.rotate(90, expand=True)", turn=0),
             call(0, [{"op": "crop", "box": [0, 0, 10, 10]}], code="result = Image.fromarray(np.array(image)[:10, :10])",
                  turn=1)]
    outcome = outcome_from_trajectory(traj(*calls))

    async def resolve(compat: bool):
        try:
            return await resolver.resolve(t, [outcome], compat)
        finally:
            await judge.aclose()

    (fixed,) = asyncio.run(resolve(False))
    assert server.requests == 0 and fixed.tool_use is None  # "red" is decided by the rules
    (compat,) = asyncio.run(resolve(True))
    assert server.requests == 1 and compat.tool_use.judge_asked == 1
    assert set(compat.tool_use.ops) == {"rotate_90", "crop"} and compat.tool_use.crop_boxes == ((0.0, 0.0, 10.0, 10.0),)
    (scored,) = score_group(t, [compat], COMPAT)
    assert scored.total == pytest.approx(1.6)
