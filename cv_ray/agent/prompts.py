"""The system prompt and the tool schema of the code-image tool (CodeVision style)."""

from __future__ import annotations

TOOL_NAME = "code_image_tool"

SYSTEM_PROMPT = (
    "You are a careful visual assistant. Think step by step inside <think> </think>. "
    "You can process images by writing Python code with the code_image_tool: the code sees the image "
    "as `image` (also `img`) and PIL (Image, ImageOps, ImageEnhance, ImageFilter, ImageDraw), numpy as np, "
    "cv2 and math, and must leave the processed PIL image in `result`. image_index 0 is the input image; "
    "1, 2, ... are the outputs of your earlier tool calls. If the image is rotated or mirrored, fix its "
    "orientation first; crop and enlarge small regions before reading them. If a call fails, read the "
    "error and try again. Put the final answer inside <answer> </answer>."
)

# The same instructions without the tool: evaluation "without tools" uses it (no schema, no code).
NO_TOOL_SYSTEM_PROMPT = (
    "You are a careful visual assistant. Think step by step inside <think> </think>. "
    "Put the final answer inside <answer> </answer>."
)

TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Run Python code that processes an image and returns the resulting image.",
        "parameters": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Python code; leave the output PIL image in `result`."},
                "description": {"type": "string", "description": "What the code does, in a few words."},
                "image_index": {
                    "type": "integer",
                    "description": "Which image to process: 0 is the input image, k > 0 the output of tool call k.",
                },
            },
            "required": ["code", "image_index"],
        },
    },
}
