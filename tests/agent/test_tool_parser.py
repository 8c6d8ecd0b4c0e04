"""Tool-call parsing: valid calls, and every malformed shape mapped to its counted error class."""

from __future__ import annotations

import json

import pytest

from cv_ray.agent.tool_format import format_tool_call
from cv_ray.agent.tool_parser import PARSE_ERROR_CLASSES, parse_call_payload, parse_tool_calls


def payload(arguments, name="code_image_tool") -> str:
    return json.dumps({"name": name, "arguments": arguments})


VALID = [
    (payload({"code": "result = image", "image_index": 0}), ("result = image", 0, "")),
    (payload({"code": "result = img", "image_index": 3, "description": "crop"}), ("result = img", 3, "crop")),
    (payload({"code": "result = img", "image_index": 1, "description": None}), ("result = img", 1, "")),
    # Arguments written as a JSON string holding an object are accepted.
    (json.dumps({"name": "code_image_tool", "arguments": json.dumps({"code": "x = 1", "image_index": 2})}),
     ("x = 1", 2, "")),
]

INVALID = [
    ("{not json", "malformed_json"),
    ("[1, 2]", "malformed_json"),
    (json.dumps({"arguments": {"code": "x", "image_index": 0}}), "malformed_json"),
    (json.dumps({"name": "code_image_tool", "arguments": {"code": "x", "image_index": 0}, "id": 3}), "malformed_json"),
    (payload({"code": "x", "image_index": 0}, name="python"), "unknown_tool"),
    (json.dumps({"name": "code_image_tool"}), "missing_argument"),
    (payload({"image_index": 0}), "missing_argument"),
    (payload({"code": "x"}), "missing_argument"),
    (payload({"code": 5, "image_index": 0}), "bad_argument"),
    (payload({"code": "   ", "image_index": 0}), "bad_argument"),
    (payload({"code": "x", "image_index": "1"}), "bad_argument"),
    (payload({"code": "x", "image_index": 1.0}), "bad_argument"),
    (payload({"code": "x", "image_index": True}), "bad_argument"),
    (payload({"code": "x", "image_index": -1}), "bad_argument"),
    (payload({"code": "x", "image_index": 0, "description": 7}), "bad_argument"),
    (payload({"code": "x", "image_index": 0, "angle": 90}), "bad_argument"),
    (json.dumps({"name": "code_image_tool", "arguments": "not an object"}), "bad_argument"),
    (json.dumps({"name": "code_image_tool", "arguments": [1]}), "bad_argument"),
]


@pytest.mark.parametrize("text,expected", VALID)
def test_valid_payloads(text, expected):
    call = parse_call_payload(text)
    assert call.ok, call.error
    assert (call.code, call.image_index, call.description) == expected


@pytest.mark.parametrize("text,error_class", INVALID)
def test_invalid_payloads_get_a_class_and_a_message(text, error_class):
    call = parse_call_payload(text)
    assert not call.ok
    assert call.error_class == error_class
    assert error_class in PARSE_ERROR_CLASSES
    assert call.error  # the model reads this


def test_turn_with_several_calls_keeps_their_order():
    text = ("<think>first rotate, then crop</think>" + format_tool_call("a = 1", 0) + "\n"
            + "<tool_call>\n{broken\n</tool_call>" + format_tool_call("b = 2", 1, "zoom"))
    calls = parse_tool_calls(text)
    assert [c.error_class for c in calls] == [None, "malformed_json", None]
    assert calls[1].payload == "\n{broken\n"  # exactly as written, whitespace included
    assert [(c.code, c.image_index) for c in calls if c.ok] == [("a = 1", 0), ("b = 2", 1)]


def test_round_trip_of_the_shared_formatter():
    code = 'result = image.crop((0, 0, 10, 10))\nprint("ok")'
    (call,) = parse_tool_calls(format_tool_call(code, 2, "corner"))
    assert (call.code, call.image_index, call.description) == (code, 2, "corner")


def test_unclosed_call_is_one_malformed_call_and_no_call_is_empty():
    (unclosed,) = parse_tool_calls('<tool_call>\n{"name": "code_image_tool"')
    assert (unclosed.error_class, unclosed.payload) == ("malformed_json", None)
    assert parse_tool_calls("<think>fine</think><answer>3</answer>") == []
