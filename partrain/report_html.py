"""The markup of `partrain report`: one self-contained HTML page (report.py gathers what it shows).

Everything the page needs is inside it: the style sheet inline, every figure a base64 PNG, no
script, no font or image fetched from anywhere, so it opens from a file, an e-mail or an archive
years later as it did on the day. Every text from a run folder is escaped (a run folder's name or
a class name could hold markup). The layout is one column at laptop width (figures two to a row
where there is room) and prints on A4 or Letter (the print style sheet drops the contents line
and keeps figures and tables whole).
"""
from __future__ import annotations

import base64
import html
import struct

CSS = """
:root { --fg: #1d2433; --muted: #5b6472; --line: #d9dee6; --soft: #f4f6f9; --accent: #2b6cb0; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
             sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 1.55rem; margin: 0 0 4px; word-break: break-word; }
h2 { font-size: 1.2rem; margin: 30px 0 12px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 1rem; margin: 14px 0 6px; }
.sub { color: var(--muted); margin: 0; }
nav { margin: 14px 0 0; font-size: .9rem; }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(165px, 1fr));
         gap: 10px; }
.card { background: var(--soft); border: 1px solid var(--line); border-radius: 6px;
        padding: 8px 12px; }
.card .k { color: var(--muted); font-size: .8rem; }
.card .v { font-size: 1.12rem; font-weight: 600; font-variant-numeric: tabular-nums;
           word-break: break-word; }
.figs { display: grid; gap: 16px;
        grid-template-columns: repeat(auto-fit, minmax(min(100%, 440px), 1fr)); }
figure { margin: 0; }
figure img { display: block; width: 100%; height: auto; border: 1px solid var(--line);
             border-radius: 4px; }
figure.wide img { max-width: 900px; }
figcaption { color: var(--muted); font-size: .85rem; margin-top: 4px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .9rem; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
th { font-weight: 600; background: var(--soft); }
td.num, th.num { text-align: right; white-space: nowrap; }
tr.changed td { background: #fff6dc; }
.bar { display: inline-block; height: .7em; background: var(--accent); border-radius: 2px;
       -webkit-print-color-adjust: exact; print-color-adjust: exact; }
.note { color: var(--muted); background: var(--soft); border-left: 3px solid var(--line);
        padding: 6px 10px; margin: 8px 0; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .88em;
       background: var(--soft); padding: 1px 4px; border-radius: 3px; word-break: break-all; }
.finished { color: #276749; } .interrupted { color: #975a16; } .running { color: #2b6cb0; }
.failed, .unreadable { color: #c53030; }
footer { margin-top: 36px; color: var(--muted); font-size: .8rem; }
@media print {
  @page { margin: 14mm; }
  body { font-size: 10pt; }
  main { max-width: none; padding: 0; }
  nav { display: none; }
  h2 { break-after: avoid; }
  figure, table, .card, .note { break-inside: avoid; }
  .figs { grid-template-columns: 1fr 1fr; }
  figure.wide { grid-column: 1 / -1; }
  a { color: inherit; text-decoration: none; }
  .card, th { background: none; }
  tr.changed td { background: none; font-weight: 600; }
}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]], footer: str) -> str:
    """The whole document. sections: (id, heading, inner HTML), in order."""
    nav = "".join(f'<a href="#{sid}">{esc(head)}</a>' for sid, head, _ in sections)
    body = "\n".join(f'<section id="{sid}">\n<h2>{esc(head)}</h2>\n{inner}\n</section>'
                     for sid, head, inner in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="generator" content="partrain">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<header>\n<h1>{esc(title)}</h1>\n<p class=\"sub\">{subtitle}</p>\n"
            f"<nav>{nav}</nav>\n</header>\n{body}\n<footer>{footer}</footer>\n"
            f"</main>\n</body>\n</html>\n")


def cards(items: list[tuple[str, str]]) -> str:
    """Key numbers as a grid of small boxes; values are HTML (escape them first)."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{v}</div></div>'
        for k, v in items) + "</div>"


def table(headers: list[str] | None, rows: list[list[str]], numeric: set[int] = frozenset(),
          row_classes: list[str] | None = None) -> str:
    """A table (no header row if headers is None); cells are HTML (escape them first); columns
    in `numeric` align right."""
    def cell(tag, i, text):
        return f'<{tag}{" class=num" if i in numeric else ""}>{text}</{tag}>'
    head = ("<thead><tr>" + "".join(cell("th", i, esc(h)) for i, h in enumerate(headers))
            + "</tr></thead>") if headers else ""
    body = []
    for r, cells_ in enumerate(rows):
        cls = (row_classes or [""] * len(rows))[r]
        body.append(f'<tr{f" class={cls}" if cls else ""}>'
                    + "".join(cell("td", i, c) for i, c in enumerate(cells_)) + "</tr>")
    return (f'<div class="scroll"><table>{head}<tbody>{"".join(body)}'
            f"</tbody></table></div>")


def figure(png: bytes, alt: str, caption: str = "", wide: bool = False, scale: float = 1.0) -> str:
    """A PNG inline (base64), shown at most at its pixel size / `scale` (figures of DPI 130 at
    1.3 look as matplotlib's 100-DPI screen size), with its intrinsic size declared."""
    width, height = png_size(png)
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (f'<figure{" class=wide" if wide else ""}><img src="data:image/png;base64,{data}" '
            f'alt="{esc(alt)}" width="{width}" height="{height}" '
            f'style="max-width:{round(width / scale)}px">{cap}</figure>')


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; ValueError if it is not a PNG."""
    if len(png) < 24 or png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    return struct.unpack(">II", png[16:24])


def note(text_html: str) -> str:
    return f'<p class="note">{text_html}</p>'


def code(text: str) -> str:
    return f"<code>{esc(text)}</code>"


def bar(fraction: float | None, width_px: int = 120) -> str:
    """An inline bar as long as `fraction` of width_px (plain CSS: prints too)."""
    if fraction is None or fraction != fraction:
        return ""
    return f'<span class="bar" style="width:{round(max(0.0, min(1.0, fraction)) * width_px)}px"></span>'


def status(state: str, status_name: str | None) -> str:
    return f'<span class="{esc(status_name or "")}">{esc(state or "")}</span>'
