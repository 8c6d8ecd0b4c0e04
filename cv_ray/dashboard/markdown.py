"""The Markdown our reports are written in, as HTML: headings, pipe tables, bullet lists, paragraphs.

Enough for ``eval/report.md`` (cv_ray/eval/report.py) to show inside the dashboard; anything else
is kept as an escaped paragraph, so no text is lost. Inline: `` `code` `` and ``**bold**``.
"""

from __future__ import annotations

import html
import re

_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*")


def _inline(text: str) -> str:
    out, done = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[done:m.start()]))
        out.append(f"<code>{html.escape(m.group(1))}</code>" if m.group(1) is not None
                   else f"<b>{html.escape(m.group(2))}</b>")
        done = m.end()
    return "".join(out) + html.escape(text[done:])


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _is_rule(line: str) -> bool:
    """A table's header rule, e.g. ``|---|:--:|``."""
    return bool(re.fullmatch(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?", line.strip()))


def markdown_to_html(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _is_rule(lines[i + 1]):
            head = "".join(f"<th>{_inline(c)}</th>" for c in _cells(line))
            rows, i = [], i + 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(lines[i])) + "</tr>")
                i += 1
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        elif re.match(r"\s*[-*]\s+", line):
            items = []
            while i < len(lines) and (item := re.match(r"\s*[-*]\s+(.*)", lines[i])):
                items.append(f"<li>{_inline(item.group(1))}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"#{1,6}\s|\s*[-*]\s+|\s*\|", lines[i]):
                para.append(lines[i].strip())
                i += 1
            if not para:  # a line no rule above took (e.g. a lone `|` row): kept as text
                para, i = [line.strip()], i + 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)
