"""How the reference reads tool use (``reward.reference_compat=true``): which calls count, and the ops
and crop boxes read from a call's code and description. Hand-derived tables; each row names the
reference function it follows (ByteDance-BandAI/CodeVision ``verl/utils/reward_score/tool_use_judge.py``
unless stated). The fixed reward reads the sandbox's verified ops instead (tests in test_dense.py).
"""

from __future__ import annotations

import json

import pytest

from cv_ray.reward.reference_tools import (
    CallText,
    CodeReading,
    handled_calls,
    merge_judge_reading,
    read_code,
    reference_tool_use,
)


def payload(arguments, name="code_image_tool", **extra) -> str:
    return "\n" + json.dumps({"name": name, "arguments": arguments, **extra}) + "\n"


def text_call(turn: int, text: str | None, error_shown: bool = False) -> CallText:
    return CallText(turn=turn, payload=text, error_shown=error_shown)


CODE = {"code": "result = image.rotate(90, expand=True)", "image_index": 0}


@pytest.mark.parametrize("text, handled", [
    # tool_parser.py HermesToolParser.extract_tool_calls: a JSON object with "name" (a string) and "arguments"
    (payload(CODE), True),
    ('{"name": "code_image_tool", "arguments": {', False),                  # not JSON: dropped
    (json.dumps({"arguments": CODE}), False),                                # no name
    (json.dumps({"name": "code_image_tool"}), False),                        # no arguments
    (json.dumps({"name": 7, "arguments": CODE}), False),                     # a name that is no string
    ("[1, 2]", False),
    (None, False),                                                           # (records of unclosed calls)
    # ours refuses these, the reference runs them (and counts them)
    (payload(CODE, id=3), True),                                             # an extra key
    (payload(CODE, name="python"), True),                                    # an unknown tool: runs, fails
    (payload(json.dumps(CODE)), True),                                       # arguments as JSON text
    (payload({"image_index": 0}), True),                                     # no code
])
def test_which_calls_the_reference_parses(text, handled):
    """Mutant: compat counts every call our parser saw (malformed JSON included)."""
    call = text_call(0, text) if text is not None else CallText(0, None, parsed=False, error_class="malformed_json")
    assert len(handled_calls([call])) == int(handled)


def test_one_call_per_turn_and_what_is_read_of_it():
    """tool_agent_loop.py ``_handle_processing_tools_state``: ``tool_calls[:max_parallel_calls]`` with the
    recipe's max_parallel_calls=1; args that are not an object read as no code; an empty name is run but
    not read. Mutant: every parsed call of a turn is handled."""
    calls = [
        text_call(0, '{"broken'),                                             # turn 0: dropped, then
        text_call(0, payload({**CODE, "description": "crop"})),               # the first parsed one is handled
        text_call(0, payload(CODE)),                                          # a second one is not
        text_call(1, payload(json.dumps(CODE)), error_shown=True),            # arguments as text: code ""
        text_call(2, payload(CODE, name="")),                                 # empty name: counted, not read
        text_call(3, payload({"code": 5, "description": {"text": "flip horizontal"}})),
    ]
    read = handled_calls(calls)
    assert [(c.code, c.description, c.analyzed) for c in read] == [
        ("result = image.rotate(90, expand=True)", "crop", True),
        ("", "", True),
        (CODE["code"], "", False),
        ("5", "", True),  # str() of a non-text code; a dict description reads as "" (its key lookup is broken)
    ]
    use = reference_tool_use(calls)
    # turn 0: rotate_90 from the code, crop from the description (no box); turn 2 read nothing
    assert use.ops == ("rotate_90", "crop") and use.crop_boxes == ()
    assert (use.code_count, use.errors, use.used_any_tool) == (4, 1, True)
    assert use.exec_ratio == pytest.approx(3 / 4)  # agent loop's tool_exec_success


@pytest.mark.parametrize("code, ops, boxes", [
    # _rotations_from_code: PIL rotate within 5 degrees of a quarter turn (counter-clockwise)
    ("result = image.rotate(90, expand=True)", ["rotate_90"], []),
    ("result = image.rotate(-90)", ["rotate_270"], []),                    # -90 % 360 = 270
    ("result = image.rotate(180.0 + 3, expand=True)", ["rotate_180"], []),  # literal arithmetic, within 5 degrees
    ("result = image.rotate(45, expand=True)", [], []),
    ("angle = 90\nresult = image.rotate(angle)", [], []),                  # a name: the angle is unknown
    ("result = image.transpose(Image.ROTATE_270)", ["rotate_270"], []),
    ("result = image.transpose(Image.Transpose.ROTATE_270)", [], []),      # only Image.ROTATE_* is known
    ("a = np.rot90(np.array(image))", ["rotate_90"], []),
    ("a = np.rot90(arr, k=3)", ["rotate_270"], []),
    ("a = np.rot90(np.array(image), k=3)", ["rotate_90"], []),            # the first argument stops at "(image)"
    ("a = np.rot90(arr, 2)", ["rotate_90"], []),                           # a positional k is not read: k = 1
    ("a = cv2.rotate(arr, cv2.ROTATE_90_CLOCKWISE)", ["rotate_270"], []),
    # _flips_from_code: PIL transposes and ImageOps only
    ("result = ImageOps.mirror(image)", ["flip_horizontal"], []),
    ("result = image.transpose(Image.FLIP_TOP_BOTTOM)", ["flip_vertical"], []),
    ("a = cv2.flip(arr, 1)", [], []),
    # _other_transforms_from_code: names by pattern, enhance factors graded at 1.05 / 0.95
    ("result = ImageEnhance.Contrast(image).enhance(1.8)", ["contrast_up"], []),
    ("result = ImageEnhance.Contrast(image).enhance(1.0)", ["contrast"], []),  # an op that changes nothing
    ("result = ImageEnhance.Brightness(image).enhance(f)", ["brightness"], []),
    ("result = image.resize((200, 200))", ["resize"], []),
    ("result = image.filter(ImageFilter.GaussianBlur(2)).convert('L')", ["gaussian_blur", "grayscale"], []),
    ("a = cv2.convertScaleAbs(arr, alpha=1.5, beta=-10)", ["contrast_up", "brightness_down"], []),
    # _extract_crop_boxes_from_ast + _regex_literal_crops + _dedup_boxes: "crop" only with a box
    ("result = image.crop((10, 20, 30, 40))", ["crop"], [(10.0, 20.0, 30.0, 40.0)]),
    ("x1, y1 = 10, 20\nx2 = x1 + 20\nresult = img.crop((x1, y1, x2, int(40.7)))", ["crop"], [(10.0, 20.0, 30.0, 40.0)]),
    ("w, h = image.size\nresult = image.crop((0, 0, w // 2, h))", [], []),  # from the image's size: no box, no crop
    ("box = (1, 2, 3, 4); result = image.crop(box)", [], []),              # bound on the crop's own line: unknown
    ("result = image.crop((1/3, 0, 10, 10))", ["crop"], [(0.333333, 0.0, 10.0, 10.0)]),  # rounded to 6 places
    ("a = image.crop((0, 0, 9, 9))\nb = a.crop((0, 0, 9, 9))", ["crop"], [(0.0, 0.0, 9.0, 9.0)]),  # deduplicated
    # a rotation then a crop in one call: the box as written, in the rotated image's frame
    ("result = image.rotate(90, expand=True).crop((20, 10, 60, 50))", ["rotate_90", "crop"],
     [(20.0, 10.0, 60.0, 50.0)]),
    # an int literal too large for a float stops the AST reading (the second crop's name-bound box is lost);
    # the literal regex reads the first box, its huge number as inf
    ("a = image.crop((0, 0, 1" + "0" * 320 + ", 5))\nx = 1\nb = image.crop((x, 1, 5, 5))", ["crop"],
     [(0.0, 0.0, float("inf"), 5.0)]),
    ("result = image.rotate(", [], []),                                    # not Python: regexes only, none match
])
def test_ops_read_from_code(code, ops, boxes):
    """Mutant (each row): one detector changed, e.g. np.rot90's positional k read as k."""
    reading = read_code(code)
    assert list(reading.ops) == ops and list(reading.crop_boxes) == boxes


@pytest.mark.parametrize("description, ops, boxes", [
    # _transforms_from_description / _boxes_from_description (boxes only when the code has none)
    ("Crop the sign", ["crop"], []),
    ("flip it horizontally", ["flip_horizontal"], []),
    ("zoom into [10, 20, 30.5, 40]", [], [(10.0, 20.0, 30.5, 40.0)]),    # a box, but no "crop" op
    ("region [1.2.3, 4, 5, 6] or (5, 5, 50, 50)", [], [(5.0, 5.0, 50.0, 50.0)]),  # [..] is no number: (..) next
])
def test_ops_read_from_the_description(description, ops, boxes):
    reading = read_code("result = image", description)
    assert list(reading.ops) == ops and list(reading.crop_boxes) == boxes


HEURISTIC = CodeReading((), ((5.0, 5.0, 50.0, 50.0),))


@pytest.mark.parametrize("reply, ops, boxes", [
    # ToolUseJudgeClient.analyze, LLM branch: rotations dropped (the code does not corroborate them),
    # the LLM's 4-number boxes first, then the heuristic's (from the description)
    ('{"transforms": ["rotate_90", "contrast_up"], "crop_boxes": [[1, 2, 3, 4], [1, 2, 3], ["4", "5", "6", "7"]]}',
     ["contrast_up"], [(1.0, 2.0, 3.0, 4.0), (4.0, 5.0, 6.0, 7.0), (5.0, 5.0, 50.0, 50.0)]),
    ('  {"transforms": ["crop", "crop", 5]}\n', ["crop", 5], [(5.0, 5.0, 50.0, 50.0)]),
    ('{"transforms": "crop"}', ["c", "r", "o", "p"], [(5.0, 5.0, 50.0, 50.0)]),  # a string is iterated
    ("not json", [], [(5.0, 5.0, 50.0, 50.0)]),                                  # unusable: the heuristic's
    ('```json\n{"transforms": ["crop"]}\n```', [], [(5.0, 5.0, 50.0, 50.0)]),
    ('{"transforms": null}', [], [(5.0, 5.0, 50.0, 50.0)]),
    ('{"transforms": [["x"]]}', [], [(5.0, 5.0, 50.0, 50.0)]),                  # unhashable
    (None, [], [(5.0, 5.0, 50.0, 50.0)]),                                        # the judge failed
])
def test_judge_reading(reply, ops, boxes):
    """Mutant: rotations the LLM names are kept."""
    reading = merge_judge_reading(reply, HEURISTIC)
    assert list(reading.ops) == ops and list(reading.crop_boxes) == boxes
