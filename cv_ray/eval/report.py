"""The evaluation report: `metrics.json`, a Markdown table and PNG plots in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("with_tools", "without_tools")


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(summaries: dict[str, dict], title: str) -> str:
    """Side-by-side tables of the two modes: overall numbers, then accuracy per transform and suite."""
    modes = [m for m in MODES if m in summaries]
    lines = [f"# {title}", "", "| metric | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for key in ("n", "accuracy", "consistency", "tool_use_rate", "tool_calls_per_sample", "tool_error_rate",
                "mean_turns", "op_precision", "op_recall", "crop_iou_mean", "crop_rate_when_required"):
        lines.append(f"| {key} | " + " | ".join(_fmt(summaries[m].get(key)) for m in modes) + " |")
    for table in ("accuracy_by_transform", "accuracy_by_suite"):
        keys = sorted({k for m in modes for k in summaries[m].get(table, {})})
        lines += ["", f"## {table.replace('_', ' ')}", "", "| | " + " | ".join(modes) + " |",
                  "|---|" + "---|" * len(modes)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_fmt(summaries[m].get(table, {}).get(k)) for m in modes) + " |")
    errors = summaries.get("with_tools", {}).get("tool_errors_by_class", {})
    if errors:
        lines += ["", "## tool errors by class (with tools)", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def _bar_plot(path: Path, series: dict[str, dict[str, float | None]], title: str, ylabel: str) -> None:
    keys = sorted({k for values in series.values() for k in values})
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(keys) + 2), 3.6))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [values.get(k) or 0.0 for k in keys], width=width, label=label.replace("_", " "))
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels(keys, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, summaries: dict[str, dict], title: str = "cv_ray evaluation") -> dict[str, Path]:
    """Write metrics.json, report.md and the two plots; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out_dir / "metrics.json",
        "report": out_dir / "report.md",
        "accuracy_plot": out_dir / "accuracy_by_transform.png",
        "tool_use_plot": out_dir / "tool_use_by_transform.png",
    }
    paths["metrics"].write_text(json.dumps(summaries, indent=2))
    paths["report"].write_text(markdown(summaries, title))
    _bar_plot(paths["accuracy_plot"], {m: summaries[m]["accuracy_by_transform"] for m in MODES if m in summaries},
              "Accuracy by transform", "accuracy")
    tool_series = {"with_tools": summaries["with_tools"]["tool_use_rate_by_transform"]} if "with_tools" in summaries else {}
    _bar_plot(paths["tool_use_plot"], tool_series, "Tool-use rate by transform", "samples with >= 1 tool call")
    return paths


def comparison_rows(summaries_by_model: dict[str, dict[str, dict]]) -> list[dict]:
    """One row per model (in order): accuracy with and without tools, tool use, and the share of tool
    calls that parsed and ran (``valid_calls``; None when no call was made). Pure."""
    rows = []
    for name, summaries in summaries_by_model.items():
        tools = summaries.get("with_tools", {})
        error_rate = tools.get("tool_error_rate")
        rows.append({"model": name, "accuracy_with_tools": tools.get("accuracy"),
                     "accuracy_without_tools": summaries.get("without_tools", {}).get("accuracy"),
                     "tool_use_rate": tools.get("tool_use_rate"),
                     "valid_calls": None if error_rate is None else 1.0 - error_rate,
                     "n": tools.get("n")})
    return rows


def write_comparison(out_dir: Path, summaries_by_model: dict[str, dict[str, dict]]) -> dict[str, Path]:
    """``comparison.md`` (a table, one row per model) and ``comparison.json`` (the same rows)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(summaries_by_model)
    lines = ["# cv_ray evaluation: models side by side", "",
             "| model | accuracy with tools | accuracy without tools | tool use | valid tool calls | tasks |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {_fmt(r['accuracy_with_tools'])} | {_fmt(r['accuracy_without_tools'])} | "
              f"{_fmt(r['tool_use_rate'])} | {_fmt(r['valid_calls'])} | {r['n'] if r['n'] is not None else '-'} |"
              for r in rows]
    paths = {"comparison": out_dir / "comparison.md", "comparison_metrics": out_dir / "comparison.json"}
    paths["comparison"].write_text("\n".join(lines) + "\n")
    paths["comparison_metrics"].write_text(json.dumps(rows, indent=2))
    return paths

