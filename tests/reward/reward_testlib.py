"""Builders shared by the reward tests: outcomes, ops and trajectories with real geometry."""

from __future__ import annotations

from cv_ray.agent.tool_format import format_tool_call
from cv_ray.reward.outcome import SampleOutcome, UsedOp
from cv_ray.types import ExecResult, Task, ToolCallRecord, Trajectory


def text(answer: str, well_formed: bool = True) -> str:
    """A response whose format reward is 1 (``well_formed``) or 0 (no think block)."""
    return f"<think>look</think><answer>{answer}</answer>" if well_formed else f"<answer>{answer}</answer>"


def op(name: str, box=None, changed: bool = True, ok: bool = True, raw_box=None) -> UsedOp:
    """An op; for a crop made on image 0, the mapped box and the raw box are the same."""
    return UsedOp(name=name, changed=changed, call_ok=ok, box=box, raw_box=raw_box if raw_box is not None else box)


def sample(correct: bool | None, ops=(), calls: int | None = None, errors: int = 0, answer: str = "x",
           well_formed: bool = True) -> SampleOutcome:
    """An outcome; by default one code call per op batch given, i.e. ``calls = 1 if ops else 0``."""
    return SampleOutcome(response_text=text(answer, well_formed), correct=correct, ops=list(ops),
                         num_code_calls=(1 if ops else 0) if calls is None else calls, num_tool_errors=errors)


def task(required=(), answer_box=None, answer: str = "7", task_type: str = "general", choices=None,
         question: str = "What is it?") -> Task:
    return Task(uid="t0", data_source="test", question=question, images=[], answer=answer, choices=choices,
                required_ops=list(required), answer_box=answer_box, task_type=task_type)


def call(image_index: int, ops: list[dict], ok: bool = True, output_index: int | None = None,
         to_input=None, code: str = "...", description: str = "", turn: int | None = None) -> ToolCallRecord:
    """A parsed call on image ``image_index`` (made in turn ``image_index`` unless ``turn`` is given).
    ``code`` is what the reference-compatible reward reads ops from ("..." reads as no op)."""
    result = ExecResult(ok=ok, ops=ops, to_input=to_input,
                        error=None if ok else "Error: boom", error_class=None if ok else "runtime")
    return ToolCallRecord(turn=image_index if turn is None else turn, parsed=True, code=code,
                          description=description, payload=format_payload(code, image_index, description),
                          image_index=image_index, output_index=output_index, result=result)


def format_payload(code: str, image_index: int = 0, description: str = "") -> str:
    """The text between the tool-call tags for a well-formed call (as the agent loop records it)."""
    return format_tool_call(code, image_index, description)[len("<tool_call>"):-len("</tool_call>")]


def trajectory(images, image_to_origin, calls, response_text: str) -> Trajectory:
    return Trajectory(uid="t0", sample_index=0, prompt_ids=[], response_ids=[], response_mask=[],
                      rollout_logprobs=[], images=images, model_images=images, image_to_origin=image_to_origin,
                      image_parent=[None] + [c.image_index for c in calls if c.ok], tool_calls=calls,
                      response_text=response_text)
