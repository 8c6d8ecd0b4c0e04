"""How the reference release reads a sample's tool use: which calls count, and the op names and
crop boxes each one used, guessed from the call's text (``reward.reference_compat=true`` only).

The reference (ByteDance-BandAI/CodeVision) never asks the sandbox what a call did. Per assistant
turn its agent loop (``verl/experimental/agent_loop/tool_agent_loop.py``):

1. parses the hermes tool calls of the turn and silently drops those that are not JSON objects with
   a ``name`` (a string) and ``arguments`` (``tool_parser.py``);
2. handles only the first parsed call (its recipe's ``multi_turn.max_parallel_calls=1``);
3. if the call has a non-empty name, reads op names and crop boxes from the ``code`` and
   ``description`` arguments with regular expressions and a small AST evaluator
   (``verl/utils/reward_score/tool_use_judge.py``, ``ToolUseJudgeClient.heuristic_parse``); when
   that finds no op at all and a judge is configured, it asks the LLM instead and keeps its answer
   (rotations only when the code corroborates them, which it cannot then);
4. counts the call (``code_count``) whether or not it ran, and as an error when the tool's reply
   contains the word ``Error``.

This module reproduces that reading detector by detector, quirks included (``np.rot90(a, 2)`` reads
as ``rotate_90``, a crop whose box comes from ``image.size`` is no crop at all, a description that
says "crop" is a crop, ``enhance(1.0)`` is an op), so that compat mode scores exactly as the
reference. The fixed reward reads the sandbox's verified ops instead (docs/reward.md).

Pure functions, no I/O. Model-written code is only parsed (``ast.parse``) and its literal arithmetic
evaluated by the small interpreter below, never executed.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The reference handles this many tool calls per assistant turn (its recipe's max_parallel_calls).
REFERENCE_CALLS_PER_TURN = 1
#: Op names the LLM may only report when the code's own reading corroborates them.
_ROTATIONS = ("rotate_90", "rotate_180", "rotate_270")
#: Errors that evaluating model-written literal arithmetic may raise (float() of a huge int or a complex,
#: int() of inf, division by zero, ...). Where the reference lets one escape, the reading stops there too.
_EVAL_ERRORS = (ArithmeticError, TypeError, ValueError, RecursionError)
#: Errors ast.parse raises on text that is not Python (or too deeply nested to parse).
_PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError)


@dataclass(frozen=True)
class CallText:
    """One tool call as text: what the reference reads of it. Built from a ``ToolCallRecord``."""

    turn: int
    """The assistant turn that made it (the reference handles the first call of each turn)."""
    payload: str | None
    """The text between the call tags exactly as written; None when unknown (records built without
    it are then read from ``parsed``/``error_class``/``code``/``description``)."""
    parsed: bool = True
    """Whether our parser accepted the call."""
    error_class: str | None = None
    """Our parser's error class when it did not."""
    code: str = ""
    description: str = ""
    error_shown: bool = False
    """Whether the tool reply the model read contains ``Error`` (the reference's failure test)."""


@dataclass(frozen=True)
class CodeReading:
    """The ops and crop boxes read from one call."""

    ops: tuple[Any, ...] = ()
    """Op names in the reference's order, unique. From the LLM they may be any JSON scalar."""
    crop_boxes: tuple[tuple[float, float, float, float], ...] = ()


@dataclass(frozen=True)
class ReferenceCall:
    """A call the reference handles: its arguments as the reference reads them."""

    code: str
    description: str
    analyzed: bool
    """False when the call's name is empty: the reference runs it but reads no ops from it."""
    error_shown: bool


@dataclass(frozen=True)
class ReferenceToolUse:
    """A sample's tool use as the reference records it (``tools_used``, ``tool_crop_boxes``, counts)."""

    ops: tuple[Any, ...] = ()
    """Every op read from every handled call, in order (``tools_used``; the reward uses it as a set)."""
    crop_boxes: tuple[tuple[float, float, float, float], ...] = ()
    code_count: int = 0
    """Handled calls (``code_count``): the usage penalty counts these."""
    errors: int = 0
    """Handled calls whose reply said ``Error`` (``tool_exec_error_count``)."""
    judge_asked: int = 0
    """Calls read by the LLM judge (0 when no judge is configured)."""

    @property
    def used_any_tool(self) -> bool:
        return bool(self.ops) or self.code_count > 0

    @property
    def exec_ratio(self) -> float:
        """The reference's logged ``R_exec``: successful share of the calls, 0 when it read no op."""
        if not self.ops or not self.code_count:
            return 0.0
        return (self.code_count - self.errors) / self.code_count


# ---------------------------------------------------------------------------------------------
# Which calls the reference handles.


def _as_text(value: Any) -> str:
    """The reference's coercion of the ``code`` argument: None is empty, anything else its str()."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _description_text(value: Any) -> str:
    """The reference's coercion of ``description``. It means to take a dict's first text field, but
    looks the keys up in the empty string it has just assigned, so a dict always reads as ""."""
    return "" if isinstance(value, dict) else _as_text(value)


def reference_call(call: CallText) -> ReferenceCall | None:
    """How the reference's parser and agent loop see one call; None when the parser drops it."""
    if call.payload is None:
        return _reference_call_without_payload(call)
    try:
        obj = json.loads(call.payload)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None
    if not isinstance(obj, dict) or "name" not in obj or "arguments" not in obj or not isinstance(obj["name"], str):
        return None
    arguments = obj["arguments"]
    code: Any = ""
    description: Any = ""
    if isinstance(arguments, dict):
        code, description = arguments.get("code", ""), arguments.get("description", "")
    return ReferenceCall(_as_text(code), _description_text(description), analyzed=bool(obj["name"]),
                         error_shown=call.error_shown)


def _reference_call_without_payload(call: CallText) -> ReferenceCall | None:
    """Fallback for records without their text: ours parsed -> the reference too; malformed JSON
    (or an unclosed call) -> dropped; other failures had a name and arguments -> run, code unknown."""
    if call.parsed:
        return ReferenceCall(call.code, call.description, analyzed=True, error_shown=call.error_shown)
    if call.error_class in (None, "malformed_json"):
        return None
    return ReferenceCall("", "", analyzed=True, error_shown=True)


def handled_calls(calls: Sequence[CallText]) -> list[ReferenceCall]:
    """The calls the reference handles: per turn, the first ``REFERENCE_CALLS_PER_TURN`` it parses."""
    handled: list[ReferenceCall] = []
    per_turn: dict[int, int] = {}
    for call in calls:
        if per_turn.get(call.turn, 0) >= REFERENCE_CALLS_PER_TURN:
            continue
        read = reference_call(call)
        if read is not None:
            per_turn[call.turn] = per_turn.get(call.turn, 0) + 1
            handled.append(read)
    return handled


# ---------------------------------------------------------------------------------------------
# Literal arithmetic, evaluated the way the reference's two small interpreters do.


def _number_of(expr: str) -> float | None:
    """A rotate angle or enhance factor: literals, unary +/- and + - * / // % of them; else None
    (the reference's numeric evaluator knows no names, tuples or calls).

    Raises what the reference lets escape (float() of an int too large for a float, or of a complex).
    """
    try:
        tree = ast.parse(expr, mode="eval")
    except _PARSE_ERRORS:
        return None
    result = _Evaluator({}, numbers_only=True)(tree.body)
    try:
        return None if result is None else float(result)
    except _EVAL_ERRORS:
        return None


_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: float(a // b), ast.Mod: lambda a, b: a % b,
}


class _Evaluator:
    """The reference's two evaluators of literal arithmetic (numbers, unary +/-, + - * / // %). The
    one for crop arguments (``numbers_only=False``) also knows names bound by earlier assignments,
    tuples/lists of numbers and ``int float abs round min max tuple list`` calls.

    Values are floats or lists of floats; None means "cannot tell". Errors the reference does not
    catch (``float()`` of a huge int literal or a complex) propagate to the caller.
    """

    def __init__(self, env: dict[str, Any], numbers_only: bool = False):
        self.env = env
        self.numbers_only = numbers_only

    def __call__(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, complex)):
            return float(node.value)  # a complex raises TypeError, as in the reference
        if self.numbers_only and not isinstance(node, (ast.UnaryOp, ast.BinOp)):
            return None
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            operand = self(node.operand)
            if operand is None:
                return None
            try:
                number = float(operand)
            except _EVAL_ERRORS:
                return None
            return number if isinstance(node.op, ast.UAdd) else -number
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self(node.left), self(node.right)
            if left is None or right is None:
                return None
            try:
                return _BINARY[type(node.op)](float(left), float(right))
            except _EVAL_ERRORS:
                return None
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self(element) for element in node.elts]
            if any(item is None for item in items):
                return None
            try:
                return [float(item) for item in items]
            except _EVAL_ERRORS:
                return None
        if isinstance(node, ast.Call):
            return self._call(node)
        return None

    def _call(self, node: ast.Call) -> Any:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        args = [self(arg) for arg in node.args]
        try:
            if name in ("int", "float", "abs"):
                if not args or args[0] is None:
                    return None
                number = float(args[0])
                return float(int(number)) if name == "int" else abs(number) if name == "abs" else number
            if name == "round":
                if not args or args[0] is None:
                    return None
                number = float(args[0])
                if len(args) >= 2 and args[1] is not None:
                    return float(round(number, int(float(args[1]))))
                return float(round(number))
            if name in ("min", "max"):
                if not args or any(a is None for a in args):
                    return None
                numbers = [float(a) for a in args]
                return float(min(numbers) if name == "min" else max(numbers))
            if name in ("tuple", "list"):
                if len(args) == 1 and isinstance(node.args[0], (ast.List, ast.Tuple)):
                    inner = self(node.args[0])
                    if isinstance(inner, list):
                        return [float(x) for x in inner]
                if args and all(a is not None for a in args):
                    return [float(a) for a in args]
        except _EVAL_ERRORS:
            return None
        return None


def _breadth_first(tree: ast.AST) -> list[ast.AST]:
    """Every node in ``ast.walk``'s order (breadth first, fields in order), without its generators:
    the reference breaks position ties in this order, and reading code is this module's hot path."""
    nodes = [tree]
    index = 0
    while index < len(nodes):
        node = nodes[index]
        index += 1
        for name in node._fields:
            value = getattr(node, name, None)
            if isinstance(value, ast.AST):
                nodes.append(value)
            elif isinstance(value, list):
                nodes.extend(item for item in value if isinstance(item, ast.AST))
    return nodes


def _by_position(nodes: list[Any]) -> list[Any]:
    """Nodes by source position (ties keep ast.walk's order, as the reference's sort does)."""
    return sorted(nodes, key=lambda node: (node.lineno, node.col_offset))


def _bind(env: dict[str, Any], node: ast.AST) -> None:
    """Replay one assignment into ``env`` the way the reference does (unknown values leave names alone)."""
    evaluate = _Evaluator(env)
    if isinstance(node, ast.Assign):
        value = evaluate(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if value is not None:
                    env[target.id] = value
            elif isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, list):
                names = [element.id for element in target.elts if isinstance(element, ast.Name)]
                if len(names) == len(value):
                    for name, item in zip(names, value):
                        env[name] = float(item)
    elif isinstance(node, ast.AnnAssign):
        if node.value is not None and isinstance(node.target, ast.Name):
            value = evaluate(node.value)
            if value is not None:
                env[node.target.id] = value
    elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
        current, right = env.get(node.target.id), evaluate(node.value)
        if current is not None and right is not None and type(node.op) in _BINARY:
            try:
                env[node.target.id] = _BINARY[type(node.op)](float(current), float(right))
            except _EVAL_ERRORS:
                pass  # the reference leaves the name as it was


def _crop_boxes_from_ast(code: str) -> list[list[float]]:
    """``x.crop(arg)`` calls whose first argument evaluates to 4 numbers, in source order.

    Each argument is evaluated with the names bound by the assignments on earlier lines (anywhere:
    loops, functions, ...), replayed in source order. The reference rebuilds that environment from
    scratch for every crop; replaying one growing prefix gives the same environments.
    """
    if code.isascii() and "crop" not in code:  # (identifiers are NFKC-normalised: non-ASCII code is parsed)
        return []
    try:
        tree = ast.parse(code)
    except _PARSE_ERRORS:
        return []
    crops, assignments = [], []
    for node in _breadth_first(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "crop":
            crops.append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            assignments.append(node)
    assignments = _by_position(assignments)
    env: dict[str, Any] = {}
    replayed = 0
    boxes: list[list[float]] = []
    for call in _by_position(crops):
        if not call.args:
            continue
        while replayed < len(assignments) and assignments[replayed].lineno < call.lineno:
            try:
                _bind(env, assignments[replayed])
            except _EVAL_ERRORS:
                pass  # an assignment the reference cannot evaluate binds nothing
            replayed += 1
        try:
            value = _Evaluator(env)(call.args[0])
        except _EVAL_ERRORS:
            break  # the reference stops reading this code at the first error it does not catch
        if isinstance(value, list) and len(value) == 4:
            boxes.append([float(v) for v in value])
    return boxes


# ---------------------------------------------------------------------------------------------
# Detectors on the code's text.

_NUM = r"([-+]?[\d.]+)"
_LITERAL_CROP = re.compile(r"\.crop\(\(\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\)\)")
_ROTATE_CALL = re.compile(r"\.rotate\(\s*([^,\)]+)\s*(?:,\s*[^)]*)?\)")
_ROT90 = re.compile(r"np\.rot90\(\s*[^,\s)]+\s*(?:,\s*k\s*=\s*([-+]?\d+))?")
_ENHANCE = re.compile(r"ImageEnhance\.(Brightness|Contrast|Sharpness|Color)\s*\(\s*[^)]+\s*\)\s*\.enhance\(\s*([^\)]+?)\s*\)")
_FILTER = re.compile(r"ImageFilter\.([A-Za-z_]+)(?:\s*\(\s*([^\)]*)\s*\))?")
_SCALE_ABS = re.compile(r"cv2\.convertScaleAbs\(\s*[^\)]*\)")
_ALPHA = re.compile(r"alpha\s*=\s*([-+]?\d+(?:\.\d+)?)")
_BETA = re.compile(r"beta\s*=\s*([-+]?\d+(?:\.\d+)?)")

#: Patterns that name one op wherever they occur (each checked once, in this order).
_FIXED_ROTATIONS = [(re.compile(r"transpose\(\s*Image\.ROTATE_" + angle + r"\s*\)"), "rotate_" + angle)
                    for angle in ("90", "180", "270")]
_CV2_ROTATIONS = [(re.compile(r"cv2\.rotate\(\s*[^,)]*\s*,\s*cv2\.ROTATE_" + flag + r"\s*\)"), name)
                  for flag, name in (("90_CLOCKWISE", "rotate_270"), ("180", "rotate_180"),
                                     ("90_COUNTERCLOCKWISE", "rotate_90"))]
_FLIPS = [(re.compile(r"ImageOps\.mirror|transpose\(\s*Image\.FLIP_LEFT_RIGHT\s*\)"), "flip_horizontal"),
          (re.compile(r"ImageOps\.flip|transpose\(\s*Image\.FLIP_TOP_BOTTOM\s*\)"), "flip_vertical")]
_CALL_ARGS = r"\(\s*[^\)]*\)"
_PRESENCE_OPS = [(re.compile(pattern), name) for pattern, name in [
    (r"\.convert\(\s*['\"]L['\"]\s*\)", "grayscale"),
    (r"cv2\.cvtColor\(\s*[^,]+,\s*cv2\.COLOR_(?:BGR|RGB)2GRAY\s*\)", "grayscale"),
    (r"\.resize\(\s*\(\s*[^\)]+\)\s*\)", "resize"),
    (r"ImageOps\.fit\(\s*[^,]+,\s*\(\s*[^\)]+\)\s*\)", "resize"),
    *[(r"ImageOps\." + name + _CALL_ARGS, name) for name in ("autocontrast", "equalize", "invert", "solarize",
                                                             "posterize")],
    (r"cv2\.GaussianBlur" + _CALL_ARGS, "gaussian_blur"),
    (r"cv2\.(?:blur|boxFilter)" + _CALL_ARGS, "blur"),
    (r"cv2\.medianBlur" + _CALL_ARGS, "median_blur"),
    (r"cv2\.Canny" + _CALL_ARGS, "edge_detect"),
    (r"cv2\.Sobel\(\s*[^\)]*\)\s*|\s*cv2\.Laplacian\(\s*[^\)]*\)", "edge_detect"),
]]
_MORPHOLOGY = [(re.compile(r"cv2\." + call + _CALL_ARGS), name)
               for call, name in (("erode", "erode"), ("dilate", "dilate"), ("equalizeHist", "equalize"))]
_FILTER_NAMES = {"BLUR": "blur", "BOXBLUR": "blur", "GAUSSIANBLUR": "gaussian_blur", "MEDIANFILTER": "median_blur",
                 "SHARPEN": "sharpen", "UNSHARPMASK": "sharpen", "SMOOTH": "smooth", "SMOOTH_MORE": "smooth",
                 "DETAIL": "detail", "FIND_EDGES": "edge_detect"}
_DESCRIPTION_BOXES = [re.compile(open_ + r"\s*" + r"\s*,\s*".join([r"(-?[\d.]+)"] * 4) + r"\s*" + close)
                      for open_, close in ((r"\[", r"\]"), (r"\(", r"\)"))]


def _unique(items: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _graded(base: str, value: float, up: float, down: float) -> str:
    return f"{base}_up" if value > up else f"{base}_down" if value < down else base


def _quarter_turn(angle: float) -> str | None:
    """The quarter turn within 5 degrees of ``angle`` (mod 360), if any."""
    for target in (90, 180, 270):
        if abs((angle - target + 180) % 360 - 180) <= 5.0:
            return f"rotate_{target}"
    return None


def _rotations(code: str) -> list[str]:
    used: list[str] = []
    for match in _ROTATE_CALL.finditer(code):
        try:
            angle = _number_of(match.group(1).strip())
        except _EVAL_ERRORS:
            continue
        if angle is not None and (turn := _quarter_turn(float(angle) % 360)):
            used.append(turn)
    used += [name for pattern, name in _FIXED_ROTATIONS if pattern.search(code)]
    for match in _ROT90.finditer(code):
        try:  # int() refuses more than 4300 digits; the reference skips such a call
            k = int(match.group(1)) % 4 if match.group(1) is not None else 1
        except ValueError:
            continue
        if k:
            used.append(f"rotate_{90 * k}")
    used += [name for pattern, name in _CV2_ROTATIONS if pattern.search(code)]
    return used


def _other_ops(code: str) -> list[str]:
    used: list[str] = []
    for match in _ENHANCE.finditer(code):
        base = match.group(1).lower()
        factor = _number_of(match.group(2).strip())  # errors escape: the reference stops here too
        used.append(base if factor is None else _graded(base, factor, 1.05, 0.95))
    for match in _FILTER.finditer(code):
        name = match.group(1).upper()
        if name in _FILTER_NAMES:
            used.append(_FILTER_NAMES[name])
        elif name.startswith("EDGE_ENHANCE"):
            used.append("edge_enhance")
    used += [name for pattern, name in _PRESENCE_OPS if pattern.search(code)]
    for match in _SCALE_ABS.finditer(code):
        segment = match.group(0)
        if alpha := _ALPHA.search(segment):
            used.append(_graded("contrast", float(alpha.group(1)), 1.05, 0.95))
        if beta := _BETA.search(segment):
            used.append(_graded("brightness", float(beta.group(1)), 0.5, -0.5))
    used += [name for pattern, name in _MORPHOLOGY if pattern.search(code)]
    return _unique(used)


def _description_ops(description: str) -> list[str]:
    text = description.lower()
    used = []
    if "horizontal" in text and ("flip" in text or "mirror" in text):
        used.append("flip_horizontal")
    if "vertical" in text and "flip" in text:
        used.append("flip_vertical")
    if "crop" in text:
        used.append("crop")
    return used


def _description_box(description: str) -> list[list[float]]:
    """The first ``[a, b, c, d]`` in the description, else the first ``(a, b, c, d)``."""
    for pattern in _DESCRIPTION_BOXES:
        match = pattern.search(description)
        if match:
            try:
                return [[float(v) for v in match.groups()]]
            except ValueError:  # "1.2.3" matches [\d.]+ but is no number
                continue
    return []


def _literal_crops(code: str) -> list[list[float]]:
    boxes = []
    for match in _LITERAL_CROP.finditer(code):
        try:
            boxes.append([float(v) for v in match.groups()])
        except ValueError:
            continue
    return boxes


def _dedup(boxes: Sequence[Sequence[float]]) -> list[tuple[float, float, float, float]]:
    """Boxes rounded to 6 decimals, first occurrence kept (the reference keeps the rounded values)."""
    keys = [tuple(round(float(v), 6) for v in box) for box in boxes]
    return list(dict.fromkeys(keys))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=4096)
def read_code(code: str, description: str = "") -> CodeReading:
    """The ops and crop boxes the reference's heuristics read from one call (no LLM).

    A code whose literal arithmetic the reference's evaluator cannot survive (a complex or huge
    enhance factor) has no defined reading there; here it reads as nothing.
    """
    try:
        boxes = _dedup(_crop_boxes_from_ast(code) + _literal_crops(code))
        ops = _rotations(code) + [name for pattern, name in _FLIPS if pattern.search(code)] + _other_ops(code)
    except _EVAL_ERRORS:
        return CodeReading()
    if boxes:
        ops.append("crop")
    ops = _unique(ops + _description_ops(description))
    if not boxes:
        boxes = [tuple(box) for box in _description_box(description)]  # type: ignore[misc]
    return CodeReading(tuple(ops), tuple(boxes))  # type: ignore[arg-type]


def merge_judge_reading(content: Any, heuristic: CodeReading) -> CodeReading:
    """The reading after the LLM judge replied ``content`` for a call whose heuristics found no op.

    The reply must be exactly a JSON object; its ``transforms`` are kept except rotations (the code
    does not corroborate them, since its reading found no op), its ``crop_boxes`` that have four
    numbers come first, then the heuristic's boxes (from the description). Anything the reference
    cannot use (not JSON, not an object, unhashable names, ...) leaves the heuristic reading.
    """
    if not isinstance(content, str):
        return heuristic
    try:
        data = json.loads(content.strip())
        ops = [name for name in data.get("transforms", []) if name not in _ROTATIONS]
        boxes: list[tuple[float, float, float, float]] = []
        for box in data.get("crop_boxes", []) or []:
            try:
                boxes.append((float(box[0]), float(box[1]), float(box[2]), float(box[3])))
            except (TypeError, ValueError, IndexError, KeyError, OverflowError):
                continue
        return CodeReading(tuple(_unique(ops)), tuple(boxes) + heuristic.crop_boxes)
    except (ValueError, RecursionError, AttributeError, TypeError):
        return heuristic


@dataclass
class ToolUseReader:
    """Reads a sample's handled calls; ``readings`` may hold LLM readings by call position."""

    calls: list[ReferenceCall]
    readings: dict[int, CodeReading] = field(default_factory=dict)

    def heuristic(self, index: int) -> CodeReading:
        call = self.calls[index]
        return read_code(call.code, call.description) if call.analyzed else CodeReading()

    def needs_judge(self) -> list[int]:
        """Positions of the analysed calls whose heuristics found no op (the reference asks the LLM)."""
        return [i for i, call in enumerate(self.calls) if call.analyzed and not self.heuristic(i).ops]

    def tool_use(self) -> ReferenceToolUse:
        ops: list[Any] = []
        boxes: list[tuple[float, float, float, float]] = []
        for index in range(len(self.calls)):
            reading = self.readings.get(index) or self.heuristic(index)
            ops += reading.ops
            boxes += reading.crop_boxes
        return ReferenceToolUse(tuple(ops), tuple(boxes), code_count=len(self.calls),
                                errors=sum(call.error_shown for call in self.calls), judge_asked=len(self.readings))


def reference_tool_use(calls: Sequence[CallText]) -> ReferenceToolUse:
    """A sample's tool use as the reference reads it without an LLM judge."""
    return ToolUseReader(handled_calls(calls)).tool_use()
