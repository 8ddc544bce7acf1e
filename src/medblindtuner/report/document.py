"""The report's document model, rendered to Markdown and to self-contained HTML."""

from __future__ import annotations

import datetime as _dt
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Document model rendered to both Markdown and HTML
# --------------------------------------------------------------------------------------------


@dataclass
class _Link:
    text: str
    md_href: str
    html_href: str


Cell = str | _Link


@dataclass
class _Block:
    kind: str  # h1 | h2 | h3 | p | table | img | code
    text: str = ""
    headers: Sequence[str] = ()
    rows: Sequence[Sequence[Cell]] = ()
    numeric_from: int = 1  # columns >= this index are right-aligned


def _md_escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_md(blocks: list[_Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "code":
            out.append("```bash\n" + b.text + "\n```")
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.headers[0]})")
        elif b.kind == "table":
            head = "| " + " | ".join(_md_escape_cell(h) for h in b.headers) + " |"
            align = (
                "|"
                + "|".join("---:" if i >= b.numeric_from else ":---" for i in range(len(b.headers)))
                + "|"
            )
            lines = [head, align]
            for row in b.rows:
                cells = []
                for c in row:
                    if isinstance(c, _Link):
                        cells.append(f"[{_md_escape_cell(c.text)}]({c.md_href})")
                    else:
                        cells.append(_md_escape_cell(str(c)))
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #2ca02c; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .95em; }
th, td { border: 1px solid #ccc; padding: .35em .75em; }
th { background: #f3f6f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
pre { background: #f5f5f5; padding: .8em 1em; overflow-x: auto; border-radius: 4px; }
code { font-family: Menlo, Consolas, monospace; }
"""


def _inline_md_to_html(text: str) -> str:
    """Escape, then support the inline Markdown subset used in paragraphs (**, `, hard break)."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    return s.replace("  \n", "<br>\n")


def _render_html(blocks: list[_Block], title: str) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{_inline_md_to_html(b.text)}</p>")
        elif b.kind == "code":
            parts.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "img":
            src = html.escape(b.headers[0], quote=True)
            alt = html.escape(b.text, quote=True)
            parts.append(
                f'<figure><img src="{src}" alt="{alt}"><figcaption>{html.escape(b.text)}'
                "</figcaption></figure>"
            )
        elif b.kind == "table":
            rows = ["<table>", "<thead><tr>"]
            rows += [f"<th>{html.escape(h)}</th>" for h in b.headers]
            rows.append("</tr></thead><tbody>")
            for row in b.rows:
                rows.append("<tr>")
                for i, c in enumerate(row):
                    cls = ' class="num"' if i >= b.numeric_from else ""
                    if isinstance(c, _Link):
                        href = html.escape(c.html_href, quote=True)
                        inner = f'<a href="{href}">{html.escape(c.text)}</a>'
                    else:
                        inner = html.escape(str(c))
                    rows.append(f"<td{cls}>{inner}</td>")
                rows.append("</tr>")
            rows.append("</tbody></table>")
            parts.append("".join(rows))
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _write_docs(blocks: list[_Block], title: str, out_dir: Path) -> tuple[Path, Path]:
    md_path = out_dir / "report.md"
    html_path = out_dir / "report.html"
    md_path.write_text(_render_md(blocks), encoding="utf-8")
    html_path.write_text(_render_html(blocks, title), encoding="utf-8")
    return md_path, html_path


def _generated_line() -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Generated {now} by medblindtuner.report."
