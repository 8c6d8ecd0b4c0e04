"""Python syntax highlighting for model-written code, as HTML spans (our own, on the stdlib tokenizer).

    highlight_python("x = 1  # one")
    -> '<span class="n">x</span> <span class="o">=</span> <span class="m">1</span>  <span class="c"># one</span>'

Classes: ``k`` keyword, ``b`` builtin, ``f`` a name being defined (after ``def``/``class``), ``n``
other names, ``s`` strings, ``m`` numbers, ``c`` comments, ``o`` operators, ``x`` the unreadable
rest. Model-written code is untrusted and often broken: the tokenizer stops at the first thing it
cannot read (an unterminated triple-quoted string, a bad dedent), and from there on the text is
shown plain in an ``x`` span, escaped, never lost.
"""

from __future__ import annotations

import builtins
import html
import io
import keyword
import tokenize

_KEYWORDS = frozenset(keyword.kwlist) | frozenset(getattr(keyword, "softkwlist", ()))
_BUILTINS = frozenset(name for name in dir(builtins) if not name.startswith("_"))
_CLASS_OF_TYPE = {tokenize.STRING: "s", tokenize.NUMBER: "m", tokenize.COMMENT: "c", tokenize.OP: "o"}
# Python 3.12+ splits f-strings into pieces; they are strings too.
_CLASS_OF_TYPE.update({getattr(tokenize, name): "s" for name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                       if hasattr(tokenize, name)})


def _line_offsets(code: str) -> list[int]:
    """Offset in ``code`` of the start of each line (1-based rows, as the tokenizer counts them)."""
    offsets = [0, 0]
    for line in code.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets


def highlight_python(code: str) -> str:
    """``code`` as escaped HTML with highlighted tokens; the visible text is exactly ``code``.

    Code the tokenizer cannot read to the end gets its unread rest in a ``<span class="x">``.
    """
    offsets = _line_offsets(code)
    out: list[str] = []
    done = 0  # characters of `code` already emitted
    defining = False
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in (tokenize.ENDMARKER, tokenize.DEDENT) or not tok.string:
                continue
            start = offsets[tok.start[0]] + tok.start[1]
            end = offsets[tok.end[0]] + tok.end[1]
            if start < done or end > len(code):  # never re-emit or overrun text (defensive: offsets are exact)
                continue
            out.append(html.escape(code[done:start]))
            text = html.escape(code[start:end])
            css = _CLASS_OF_TYPE.get(tok.type)
            if tok.type == tokenize.NAME:
                css = "f" if defining else "k" if tok.string in _KEYWORDS else "b" if tok.string in _BUILTINS else "n"
                defining = tok.string in ("def", "class")
            out.append(f'<span class="{css}">{text}</span>' if css else text)
            done = end
    except (tokenize.TokenError, IndentationError, SyntaxError):
        # Broken model code (a trust boundary): the unread rest is shown, plain and marked.
        if code[done:].strip():
            return "".join(out) + f'<span class="x">{html.escape(code[done:])}</span>'
    return "".join(out) + html.escape(code[done:])
