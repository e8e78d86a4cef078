"""The building blocks of report.html: escaping, number formats, tables, bars and
the page's CSS. Every cell a block takes is escaped text (``esc``) or a block."""

from __future__ import annotations

import html
import math
from typing import Any

LIST_ROWS = 2000  # most rows a collapsed list shows; results.json holds all


def esc(x: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(x if isinstance(x, str) else str(x), quote=True)


def dict_of(res: dict[str, Any], key: str) -> dict[str, Any]:
    """``res[key]`` if it is a dict, else an empty one."""
    v = res.get(key)
    return v if isinstance(v, dict) else {}


def list_of(res: dict[str, Any], key: str) -> list[Any]:
    """``res[key]`` if it is a list, else an empty one."""
    v = res.get(key)
    return v if isinstance(v, list) else []


def finite(x: Any) -> float | None:
    """``x`` as a float if it is a finite number (not a bool), else None."""
    ok = isinstance(x, int | float) and not isinstance(x, bool)
    return float(x) if ok and math.isfinite(x) else None


def fmt_pct(x: Any) -> str:
    """A fraction as a percentage, ``–`` for no number."""
    v = finite(x)
    return "–" if v is None else f"{100 * v:.1f}%"


def fmt_bytes(x: Any) -> str:
    """A byte count in B, KB, MB or GB (powers of 1,000)."""
    v = finite(x)
    if v is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v:.0f} B"


def fmt_secs(x: Any) -> str:
    """Seconds, or minutes above one minute."""
    v = finite(x)
    if v is None:
        return "–"
    return f"{v:.2f} s" if v < 60 else f"{v / 60:.1f} min ({v:,.0f} s)"


def bar_html(x: Any) -> str:
    """A small horizontal bar of a fraction in [0, 1] (CSS only)."""
    v = finite(x)
    if v is None:
        return ""
    w = 100 * min(1.0, max(0.0, v))
    return f'<span class="bar"><span style="width:{w:.1f}%"></span></span>'


def fmt_ids(ids: Any) -> str:
    """Node ids as escaped text, at most ``LIST_ROWS`` of them."""
    if not isinstance(ids, list) or not ids:
        return "none"
    shown = ", ".join(esc(i) for i in ids[:LIST_ROWS])
    more = f" … (+{len(ids) - LIST_ROWS})" if len(ids) > LIST_ROWS else ""
    return shown + more


def html_table(
    head: list[str], rows: list[list[str]], cls: str = "", tid: str = ""
) -> str:
    """A table from escaped cells; a header cell ending in '#' is right-aligned."""
    ths = "".join(
        f'<th class="num">{h[:-1]}</th>' if h.endswith("#") else f"<th>{h}</th>"
        for h in head
    )
    nums = [h.endswith("#") for h in head]
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if n else f"<td>{c}</td>"
            for c, n in zip(r, nums, strict=False)
        )
        + "</tr>\n"
        for r in rows
    )
    attrs = (f' id="{tid}"' if tid else "") + (f' class="{cls}"' if cls else "")
    return f"<table{attrs}><thead><tr>{ths}</tr></thead><tbody>\n{body}</tbody></table>"


def kv_table(rows: list[tuple[str, str]]) -> str:
    """A two-column table of escaped label / value cells."""
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>\n" for k, v in rows)
    return f'<table class="kv"><tbody>\n{body}</tbody></table>'


CSS = """
:root{--fg:#1d2433;--mute:#667085;--line:#e4e7ec;--bg:#f6f7f9;--card:#fff;
--acc:#3b6fd8;--ok:#12805c;--bad:#c4320a;--warn:#b54708}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 24px 40px}
header h1{margin:2px 0 4px;font-size:28px;font-weight:650}
header h1 span{color:var(--mute);font-weight:400}
.kicker{margin:0;color:var(--acc);font-size:12px;font-weight:600;
text-transform:uppercase;letter-spacing:.06em}
.sub{margin:0;color:var(--mute)}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;
padding:16px 20px;margin:18px 0}
section#headline{background:none;border:none;padding:0}
h2{font-size:17px;margin:0 0 12px}
h3{font-size:13px;color:var(--mute);font-weight:600;margin:16px 0 8px;
text-transform:uppercase;letter-spacing:.04em}
.count{background:var(--bg);border-radius:10px;padding:1px 8px;font-size:13px;
color:var(--mute)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;
padding:14px 16px}
.card.main{background:linear-gradient(135deg,#3b6fd8,#5b4fc4);color:#fff;border:none}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.05em;
color:var(--mute)}
.card.main .label,.card.main .note{color:#e6e9ff}
.card .value{font-size:28px;font-weight:650;margin:2px 0;
font-variant-numeric:tabular-nums}
.card .note{font-size:12px;color:var(--mute)}
.note .rejected,.note .missing,.note .late{color:var(--bad);font-weight:600}
.chips{display:flex;flex-wrap:wrap;gap:8px}
.chip{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:6px 10px;min-width:130px}
.chip .dom{display:block;font-size:12px;color:var(--mute)}
.chip .acc{font-weight:600;margin-right:6px;font-variant-numeric:tabular-nums}
figure{margin:0;text-align:center}
figure img{max-width:100%;height:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;
vertical-align:top}
thead th{background:var(--bg);font-weight:600;color:var(--mute);font-size:12px;
position:sticky;top:0}
tbody tr:nth-child(even){background:#fafbfc}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td{overflow-wrap:anywhere}
table.kv th{width:230px;color:var(--mute);font-weight:500;background:none}
.bar{display:inline-block;width:64px;height:7px;background:var(--line);
border-radius:4px;vertical-align:middle;overflow:hidden}
.bar span{display:block;height:100%;background:var(--acc)}
.chip .bar{width:100%;display:block;margin-top:4px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px}
.badge.ok{background:#e3f5ec;color:var(--ok)}
.badge.bad{background:#fdeceb;color:var(--bad)}
.badge.warn{background:#fef4e6;color:var(--warn)}
details{margin-top:10px}
summary{cursor:pointer;font-weight:600;color:var(--acc)}
details[open] > summary{margin-bottom:8px}
section#config details{margin:0}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
overflow-wrap:anywhere}
small{color:var(--mute)}
footer{color:var(--mute);font-size:12px;text-align:center;margin-top:24px}
"""
