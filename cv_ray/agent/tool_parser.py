"""Parse hermes-style tool calls (``<tool_call>{json}</tool_call>``) out of one assistant turn.

Model-written tool calls are a trust boundary: every way a call can be wrong becomes a
:class:`ParsedToolCall` with an error class (``malformed_json``, ``unknown_tool``,
``missing_argument``, ``bad_argument``) and a message the model reads as the tool response, so it
can recover; nothing ends the episode silently.

Policy (documented in docs/rollout.md): every call block of a turn is parsed and executed in order,
each answered by its own tool message (consecutive tool messages share one user turn in the
template). The arguments are checked against ``TOOL_SCHEMA``: ``code`` (str, required),
``image_index`` (int >= 0, required; bools and floats are refused), ``description`` (str, optional);
other argument names are refused so the model learns the exact schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from cv_ray.agent.prompts import TOOL_NAME

_CALL_OPEN = "<tool_call>"
_CALL_CLOSE = "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(_CALL_OPEN) + r"(.*?)" + re.escape(_CALL_CLOSE), re.DOTALL)
_ARGUMENTS = {"code", "image_index", "description"}

#: The counted parse-error classes (ToolCallRecord.parse_error_class).
PARSE_ERROR_CLASSES = ("malformed_json", "unknown_tool", "missing_argument", "bad_argument")


@dataclass(frozen=True)
class ParsedToolCall:
    """One tool call block: valid arguments, or an error class and the message the model will read."""

    code: str = ""
    image_index: int = 0
    description: str = ""
    error_class: str | None = None
    error: str = ""
    payload: str | None = None
    """The text between the tags exactly as written (None for a call without its closing tag)."""

    @property
    def ok(self) -> bool:
        return self.error_class is None


def _fail(error_class: str, message: str) -> ParsedToolCall:
    return ParsedToolCall(error_class=error_class, error=message)


def parse_call_payload(payload: str) -> ParsedToolCall:
    """Validate the text between ``<tool_call>`` and ``</tool_call>``."""
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as exc:
        return _fail("malformed_json", f"the tool call is not valid JSON ({exc.msg} at position {exc.pos}). "
                                       'Write {"name": "code_image_tool", "arguments": {...}}.')
    if not isinstance(obj, dict) or "name" not in obj:
        return _fail("malformed_json", 'the tool call must be a JSON object with "name" and "arguments".')
    if obj["name"] != TOOL_NAME:
        return _fail("unknown_tool", f"unknown tool {obj['name']!r}; the only tool is {TOOL_NAME}.")
    extra_keys = set(obj) - {"name", "arguments"}
    if extra_keys:
        return _fail("malformed_json", f"unexpected keys {sorted(extra_keys)} in the tool call; "
                                       'use only "name" and "arguments".')
    if "arguments" not in obj:
        return _fail("missing_argument", 'the tool call has no "arguments".')
    arguments = obj["arguments"]
    if isinstance(arguments, str):
        # Some models write the arguments as a JSON string; accept it when it holds an object.
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return _fail("bad_argument", '"arguments" must be a JSON object.')
    if not isinstance(arguments, dict):
        return _fail("bad_argument", '"arguments" must be a JSON object.')
    unknown = set(arguments) - _ARGUMENTS
    if unknown:
        return _fail("bad_argument", f"unknown arguments {sorted(unknown)}; use code, image_index and description.")
    for required in ("code", "image_index"):
        if required not in arguments:
            return _fail("missing_argument", f'the argument "{required}" is required.')
    code = arguments["code"]
    if not isinstance(code, str):
        return _fail("bad_argument", '"code" must be a string of Python code.')
    if not code.strip():
        return _fail("bad_argument", '"code" is empty.')
    image_index = arguments["image_index"]
    if isinstance(image_index, bool) or not isinstance(image_index, int):
        return _fail("bad_argument", '"image_index" must be an integer (0 is the input image).')
    if image_index < 0:
        return _fail("bad_argument", '"image_index" must be 0 or more.')
    description = arguments.get("description")
    if description is not None and not isinstance(description, str):
        return _fail("bad_argument", '"description" must be a string.')
    return ParsedToolCall(code=code, image_index=image_index, description=description or "")


def parse_tool_calls(text: str) -> list[ParsedToolCall]:
    """Every tool call block of one assistant turn, in order (empty when the turn calls no tool).

    A ``<tool_call>`` without its closing tag counts as one malformed call.
    """
    calls = [replace(parse_call_payload(m.group(1).strip()), payload=m.group(1)) for m in _CALL_BLOCK.finditer(text)]
    rest = _CALL_BLOCK.sub("", text)
    if _CALL_OPEN in rest:
        calls.append(_fail("malformed_json", f"the tool call is not closed with {_CALL_CLOSE}."))
    return calls
