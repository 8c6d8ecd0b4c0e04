"""How a code-image tool call and its response look in the conversation.

One definition shared by the agent loop (rollout), the SFT trajectory generator (data) and the
evaluation, so the model is trained on exactly the text it will see at rollout time.
"""

from __future__ import annotations

import json
from typing import Any

from cv_ray.agent.prompts import TOOL_NAME
from cv_ray.types import ExecResult


def format_tool_call(code: str, image_index: int = 0, description: str = "") -> str:
    """The assistant text of one hermes-style tool call (what the policy should write)."""
    arguments: dict[str, Any] = {"code": code}
    if description:
        arguments["description"] = description
    arguments["image_index"] = image_index
    payload = json.dumps({"name": TOOL_NAME, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


def tool_success_text(output_index: int, width: int, height: int, stdout: str = "") -> str:
    text = f"Image {output_index} ({width}x{height}) is the result."
    if stdout:
        text += f"\nPrinted output:\n{stdout}"
    return text


def tool_response_content(result: ExecResult, output_index: int | None) -> list[dict[str, Any]] | str:
    """Content of the tool message for one sandbox result.

    Success: the result image (one image placeholder) and a short text naming its index, so the
    model can refer to it with ``image_index`` later. Failure: the sandbox's error text, which the
    model reads to recover.
    """
    if result.ok and result.image is not None and output_index is not None:
        w, h = result.image.size
        return [{"type": "image"}, {"type": "text", "text": tool_success_text(output_index, w, h, result.stdout)}]
    return f"Error: {result.error or 'the tool call failed'}"


def tool_error_content(message: str) -> str:
    """Content of the tool message when the call itself could not be run (parse or argument error)."""
    return f"Error: {message}"
