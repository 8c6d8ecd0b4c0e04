"""A static HTML viewer of rollout samples: every turn's code, result and image, with the reward.

Written into the run directory (`viewer/index.html`, one page per logged step) so a researcher can
open it in a browser without any server; images are small JPEG files beside the pages.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cv_ray.types import RewardBreakdown, Task, Trajectory

THUMB_SIDE = 320


@dataclass
class ViewerSample:
    uid: str
    question: str
    answer: str
    response_text: str
    reward: float
    terms: dict[str, float] = field(default_factory=dict)
    """The reward's unweighted terms (``RewardBreakdown.terms``)."""
    stats: dict[str, float] = field(default_factory=dict)
    """Log-only numbers beside the reward (``RewardBreakdown.stats``) and ``correct``."""
    images: list[Image.Image] = field(default_factory=list)
    """Image 0 first, then each tool output (the trajectory's full-resolution images)."""
    tool_calls: list[dict] = field(default_factory=list)
    """Per call: code, image_index, ok, error, output_index, ops."""

    @classmethod
    def from_rollout(cls, task: Task, traj: Trajectory, breakdown: RewardBreakdown) -> ViewerSample:
        calls = []
        for call in traj.tool_calls:
            result = call.result
            calls.append({
                "turn": call.turn,
                "code": call.code,
                "image_index": call.image_index,
                "ok": call.ok,
                "error": (result.error if result else call.parse_error_class) or "",
                "output_index": call.output_index,
                "ops": [op.get("op") for op in (result.ops if result else [])],
            })
        return cls(uid=f"{traj.uid}#{traj.sample_index}", question=task.question, answer=task.answer,
                   response_text=traj.response_text, reward=breakdown.total, terms=dict(breakdown.terms),
                   stats={**breakdown.stats, "correct": float(breakdown.correct)},
                   images=list(traj.images), tool_calls=calls)


def contact_sheet(images: list[Image.Image], side: int = 160) -> Image.Image:
    """All images side by side at a common height (for a single wandb Table cell)."""
    thumbs = []
    for im in images:
        scale = side / max(1, im.height)
        thumbs.append(im.convert("RGB").resize((max(1, round(im.width * scale)), side)))
    sheet = Image.new("RGB", (max(1, sum(t.width for t in thumbs) + 4 * len(thumbs)), side), "white")
    x = 0
    for t in thumbs:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    return sheet


class RolloutViewer:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.pages: list[tuple[str, int, str]] = []

    def _save_thumb(self, image: Image.Image, name: str) -> str:
        thumb = image.convert("RGB")
        thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
        path = self.root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        thumb.save(path, quality=85)
        return f"images/{name}"

    def add(self, samples: list[ViewerSample], step: int, stage: str) -> Path:
        """Write the page of one step and refresh the index; returns the page path."""
        self.root.mkdir(parents=True, exist_ok=True)
        esc = html.escape
        blocks = []
        for i, s in enumerate(samples):
            tag = f"{stage}-{step}-{i}"
            imgs = [self._save_thumb(im, f"{tag}-{k}.jpg") for k, im in enumerate(s.images)]
            calls = []
            for c in s.tool_calls:
                status = "ok" if c["ok"] else f"error: {esc(str(c['error']))}"
                out = (f'<img src="{imgs[c["output_index"]]}">' if c["ok"] and c["output_index"] is not None
                       and c["output_index"] < len(imgs) else "")
                calls.append(
                    f"<div class=call><b>turn {c['turn']}</b> on image {c['image_index']} — {status}"
                    f" — ops: {esc(', '.join(map(str, c['ops'])) or 'none')}<pre>{esc(c['code'])}</pre>{out}</div>"
                )
            comps = ", ".join(f"{k}={v:.3g}" for k, v in sorted({**s.terms, **s.stats}.items()))
            blocks.append(
                f"<section><h3>{esc(s.uid)} — reward {s.reward:.3f}</h3><p class=comp>{esc(comps)}</p>"
                f"<p><b>Q:</b> {esc(s.question)} <b>truth:</b> {esc(s.answer)}</p>"
                f'<img src="{imgs[0] if imgs else ""}"><pre>{esc(s.response_text)}</pre>{"".join(calls)}</section>'
            )
        name = f"{stage}-step{step:05d}.html"
        page = self.root / name
        page.write_text(_PAGE.format(title=f"{stage} step {step}", body="\n".join(blocks)))
        self.pages.append((stage, step, name))
        links = "".join(f'<li><a href="{n}">{st} step {sp}</a></li>' for st, sp, n in self.pages)
        (self.root / "index.html").write_text(_PAGE.format(title="cv_ray rollouts", body=f"<ul>{links}</ul>"))
        (self.root / "index.json").write_text(json.dumps([{"stage": a, "step": b, "page": c} for a, b, c in self.pages]))
        return page


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:sans-serif;margin:1em 2em}} section{{border-top:1px solid #ccc;padding:.5em 0}}
pre{{background:#f6f6f6;padding:.5em;white-space:pre-wrap}} img{{max-width:320px;margin:.3em;border:1px solid #ddd}}
.call{{margin-left:1.5em}} .comp{{color:#555;font-size:90%}}</style></head><body><h2>{title}</h2>
{body}</body></html>"""
