"""The pieces of a run's ending: the closing summary table and the evaluation's model comparison (pure)."""

from __future__ import annotations

from cv_ray.driver import summary_table
from cv_ray.eval.report import comparison_rows


def test_comparison_rows_read_accuracy_and_the_valid_share_of_calls():
    summaries = {"base": {"with_tools": {"accuracy": 0.0, "tool_use_rate": 0.0, "tool_error_rate": None, "n": 24}},
                 "rl": {"with_tools": {"accuracy": 0.75, "tool_use_rate": 1.0, "tool_error_rate": 0.25, "n": 24},
                        "without_tools": {"accuracy": 0.5}}}
    rows = comparison_rows(summaries)
    assert [r["model"] for r in rows] == ["base", "rl"]
    assert rows[0]["valid_calls"] is None and rows[0]["accuracy_without_tools"] is None
    assert rows[1]["valid_calls"] == 0.75 and rows[1]["accuracy_without_tools"] == 0.5


def test_summary_table_shows_each_model_and_the_first_and_last_rl_step():
    """Mutant: the RL line reads the last step as the first (a reward that fell would read as a rise)."""
    summary = {"eval": {"comparison": [
        {"model": "base", "accuracy_with_tools": 0.0, "valid_calls": None},
        {"model": "sft", "accuracy_with_tools": 0.75, "valid_calls": 1.0}]}}
    rl = [{"step": 0, "reward/total": 1.094, "tool_use/call_rate": 0.875, "tool_use/valid_call_rate": 0.866},
          {"step": 1, "reward/total": 1.3},
          {"step": 7, "reward/total": 1.751, "tool_use/call_rate": 1.047, "tool_use/valid_call_rate": 0.843}]
    assert summary_table(summary, rl) == [
        "held-out evaluation, with tools (greedy):",
        "  model  accuracy  valid tool calls",
        "  base       0.00                 -",
        "  sft        0.75              1.00",
        "RL: reward 1.09 at step 0 -> 1.75 at step 7; tool calls per trajectory 0.88 -> 1.05, valid 0.87 -> 0.84",
    ]
    assert summary_table({}, []) == []
