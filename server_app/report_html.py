"""report.html: one self-contained page of one run's results.

Everything on the page comes from the results dict (what results.json holds)
and the plots' PNG files, embedded as base64 ``<img>``: inline CSS, no script,
no external resource, ``<details>`` for what is collapsed. Every value is
HTML-escaped on its way in (``_e``): a client's domain, its rejection reason,
a metric name can hold anything, and a page must not run what a client sent.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from .persist import atomic_write_bytes

LIST_ROWS = 2000  # most rows a collapsed list shows; results.json holds all
DOMAIN_ROWS = 20  # most rows of the per-domain summary (the rest pooled in one)
CLOSED = {
    "window": "window elapsed",
    "target-clients": "target-clients reached",
    "quiet": "fleet quiet",
}
SHOWN_ELSEWHERE = {
    "method",
    "dataset",
    "partition",
    "num_clients",
    "clients",
    "rejected",
    "missing",
    "fleet",
    "mean_accuracy",
    "global_accuracy",
    "global_accuracy_per_domain",
    "global_test_size",
    "global_test",
    "mean_fid_proxy",
    "upload_bytes_total",
    "upload_bytes_per_client",
    "upload_bytes_per_class",
    "download_bytes_per_client",
    "download_bytes",
    "timings_s",
    "config",
    "class_names",
    "device",
    "synth_budget",
}


def write_report_html(
    run_dir: Path,
    res: dict[str, Any],
    plots: dict[str, Path | None],
    table_rows: int = 20,
) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path.

    ``plots``: ``accuracy`` and ``samples``, the PNG files to embed (``None``:
    the run has none); ``table_rows``: above this many clients the table is
    summarized by domain, the full list collapsed below it.
    """
    images = {k: p.read_bytes() for k, p in plots.items() if p is not None}
    path = run_dir / "report.html"
    atomic_write_bytes(path, render(res, images, table_rows).encode("utf-8"))
    return path


def render(res: dict[str, Any], images: dict[str, bytes], table_rows: int = 20) -> str:
    """The page, as a string: ``res`` is results.json's dict, ``images`` PNG bytes."""
    title = f"{_e(res.get('method'))} on {_e(res.get('dataset'))}"
    parts = [
        _header(res),
        _headline(res),
        _plot(
            "accuracy",
            "Accuracy",
            images.get("accuracy"),
            "global accuracy per domain and accuracy per client",
        ),
        _clients(res, table_rows),
        _plot(
            "samples",
            "Synthetic samples",
            images.get("samples"),
            "synthetic samples per client and class",
        ),
        _fleet(res),
        _communication(res),
        _synth_budget(res),
        _timings(res),
        _method_results(res),
        _config(res),
    ]
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}: one-shot FL report</title>\n<style>{CSS}</style>\n"
        "</head>\n<body>\n<main>\n"
        + "\n".join(p for p in parts if p)
        + "\n<footer>Written by the server with results.json, which holds every "
        "value on this page and every client.</footer>\n</main>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------- formatting


def _e(x: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(x if isinstance(x, str) else str(x), quote=True)


def _dict(res: dict[str, Any], key: str) -> dict[str, Any]:
    v = res.get(key)
    return v if isinstance(v, dict) else {}


def _list(res: dict[str, Any], key: str) -> list[Any]:
    v = res.get(key)
    return v if isinstance(v, list) else []


def _num(x: Any) -> float | None:
    ok = isinstance(x, int | float) and not isinstance(x, bool)
    return float(x) if ok and math.isfinite(x) else None


def _pct(x: Any) -> str:
    v = _num(x)
    return "–" if v is None else f"{100 * v:.1f}%"


def _bytes(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v:.0f} B"


def _secs(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "–"
    return f"{v:.2f} s" if v < 60 else f"{v / 60:.1f} min ({v:,.0f} s)"


def _bar(x: Any) -> str:
    """A small horizontal bar of a fraction in [0, 1] (CSS only)."""
    v = _num(x)
    if v is None:
        return ""
    w = 100 * min(1.0, max(0.0, v))
    return f'<span class="bar"><span style="width:{w:.1f}%"></span></span>'


def _ids(ids: Any) -> str:
    if not isinstance(ids, list) or not ids:
        return "none"
    shown = ", ".join(_e(i) for i in ids[:LIST_ROWS])
    more = f" … (+{len(ids) - LIST_ROWS})" if len(ids) > LIST_ROWS else ""
    return shown + more


def _table(head: list[str], rows: list[list[str]], cls: str = "", tid: str = "") -> str:
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


def _kv(rows: list[tuple[str, str]]) -> str:
    """A two-column table of escaped label / value cells."""
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>\n" for k, v in rows)
    return f'<table class="kv"><tbody>\n{body}</tbody></table>'


# ---------------------------------------------------------------- sections


def _header(res: dict[str, Any]) -> str:
    cfg = _dict(res, "config")
    bits = [
        f"partition {_e(res.get('partition'))}",
        f"device {_e(res.get('device'))}",
        f"seed {_e(cfg.get('seed', '–'))}",
    ]
    if cfg.get("run-name"):
        bits.insert(0, f"run {_e(cfg['run-name'])}")
    return (
        f'<header><p class="kicker">One-shot federated learning: run report</p>'
        f"<h1>{_e(res.get('method'))} <span>on</span> {_e(res.get('dataset'))}</h1>"
        f'<p class="sub">{" · ".join(bits)}</p></header>'
    )


def _card(cid: str, label: str, value: str, note: str = "", main: bool = False) -> str:
    return (
        f'<div class="card{" main" if main else ""}" id="{cid}">'
        f'<div class="label">{label}</div><div class="value">{value}</div>'
        f'<div class="note">{note}</div></div>'
    )


def _headline(res: dict[str, Any]) -> str:
    fleet = _dict(res, "fleet")
    about = _dict(res, "global_test")
    size = _num(res.get("global_test_size")) or 0
    if _num(res.get("global_accuracy")) is not None:
        by = about.get("evaluated_by")
        g_note = f"{size:,.0f} test images" + (f" · {_e(by)}" if by else "")
    else:
        g_note = f"not measured: {_e(about.get('reason') or 'no global model')}"
    asked = len(fleet.get("asked") or [])
    counts = [f"{asked} asked"] if asked else []
    for key in ("rejected", "missing", "late"):
        n = len(fleet.get(key) or res.get(key) or [])
        counts.append(f'<span class="{key if n else ""}">{n} {key}</span>')
    timings = _dict(res, "timings_s")
    cards = [
        _card(
            "global-accuracy",
            "global accuracy",
            _pct(res.get("global_accuracy")),
            g_note,
            main=True,
        ),
        _card(
            "mean-client-accuracy",
            "mean client accuracy",
            _pct(res.get("mean_accuracy")),
            "each client's held-out test set",
        ),
        _card(
            "num-clients",
            "clients used",
            _e(res.get("num_clients")),
            " · ".join(counts),
        ),
        _card(
            "upload-per-client",
            "upload per client",
            _bytes(res.get("upload_bytes_per_client")),
            f"{_bytes(res.get('upload_bytes_total'))} in all · "
            f"{_bytes(res.get('upload_bytes_per_class'))} per class",
        ),
        _card(
            "total-time",
            "server time",
            _secs(timings.get("total")),
            f"collection closed: {_closed(fleet)}",
        ),
    ]
    if _num(res.get("mean_fid_proxy")) is not None:
        cards.insert(
            2,
            _card(
                "fid-proxy",
                "mean FID-proxy",
                f"{res['mean_fid_proxy']:.3g}",
                "lower is better",
            ),
        )
    per_domain = res.get("global_accuracy_per_domain")
    chips = ""
    if isinstance(per_domain, dict) and per_domain:
        chips = (
            '<div class="chips" id="global-per-domain">'
            + "".join(
                f'<div class="chip"><span class="dom">{_e(d)}</span>'
                f'<span class="acc">{_pct(a)}</span>{_bar(a)}</div>'
                for d, a in list(per_domain.items())[:LIST_ROWS]
            )
            + "</div>"
        )
        chips = "<h3>global accuracy per domain</h3>" + chips
    return f'<section id="headline"><div class="cards">{"".join(cards)}</div>{chips}</section>'


def _plot(key: str, title: str, png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    b64 = base64.b64encode(png).decode("ascii")
    return (
        f'<section id="{key}"><h2>{title}</h2><figure>'
        f'<img id="plot-{key}" alt="{alt}" src="data:image/png;base64,{b64}">'
        "</figure></section>"
    )


def _status(c: dict[str, Any]) -> str:
    s = str(c.get("status", ""))
    cls = "ok" if s == "ok" else ("bad" if s.startswith("excluded") else "warn")
    return f'<span class="badge {cls}">{_e(s)}</span>'


def _client_rows(clients: list[dict[str, Any]]) -> list[list[str]]:
    def key(c: dict[str, Any]) -> tuple[bool, float]:
        pid = _num(c.get("partition_id"))
        return (pid is None, pid or 0.0)

    return [
        [
            _e("–" if c.get("partition_id") is None else c["partition_id"]),
            _e(c.get("node_id", "–")),
            _e(c.get("domain") or "–"),
            _e(f"{c.get('num_examples') or 0:,}"),
            _e(_bytes(c.get("upload_bytes"))),
            f"{_pct(c.get('accuracy'))} {_bar(c.get('accuracy'))}",
            _status(c),
        ]
        for c in sorted(clients, key=key)[:LIST_ROWS]
    ]


CLIENT_HEAD = [
    "partition#",
    "node#",
    "domain",
    "examples#",
    "upload#",
    "accuracy#",
    "status",
]


def _clients(res: dict[str, Any], table_rows: int) -> str:
    clients = [c for c in res.get("clients") or [] if isinstance(c, dict)]
    if not clients:
        return ""
    full = _table(CLIENT_HEAD, _client_rows(clients), "clients", "clients-table")
    more = (
        f'<p class="note">the first {LIST_ROWS} of {len(clients)} clients; '
        "results.json lists all</p>"
        if len(clients) > LIST_ROWS
        else ""
    )
    if len(clients) <= table_rows:
        return f'<section id="clients"><h2>Clients</h2>{full}</section>'
    # a fleet: one row per domain, the full list collapsed
    by: dict[str, list[dict[str, Any]]] = {}
    for c in clients:
        by.setdefault(str(c.get("domain") or "–"), []).append(c)
    per_domain = _dict(res, "global_accuracy_per_domain")
    order = sorted(by, key=lambda d: (-len(by[d]), d))
    # (label, global accuracy, clients); a domain is whatever a client says, so
    # above DOMAIN_ROWS domains the smallest are pooled in one row
    groups = [(_e(d), per_domain.get(d), by[d]) for d in order[:DOMAIN_ROWS]]
    if len(order) > DOMAIN_ROWS:
        pooled = order[DOMAIN_ROWS - 1 :]
        groups[-1] = (
            f"<em>{len(pooled)} other domains</em>",
            None,
            [c for d in pooled for c in by[d]],
        )
    rows = []
    for label, global_acc, cs in groups:
        used = [c for c in cs if c.get("status") in ("ok", "no evaluation")]
        accs = [a for c in used if (a := _num(c.get("accuracy"))) is not None]
        mean = sum(accs) / len(accs) if accs else None
        rows.append(
            [
                label,
                str(len(cs)),
                str(len(used)),
                str(len(cs) - len(used)),
                _e(f"{sum(_num(c.get('num_examples')) or 0 for c in cs):,.0f}"),
                _bytes(sum(_num(c.get("upload_bytes")) or 0 for c in cs)),
                f"{_pct(mean)} {_bar(mean)}",
                _pct(global_acc),
            ]
        )
    summary = _table(
        [
            "domain",
            "clients#",
            "used#",
            "excluded#",
            "examples#",
            "upload#",
            "mean client accuracy#",
            "global accuracy#",
        ],
        rows,
        "domains",
        "domain-table",
    )
    return (
        f'<section id="clients"><h2>Clients <span class="count">{len(clients)}'
        f"</span></h2>{summary}<details><summary>all {len(clients)} clients"
        f"</summary>{more}{full}</details></section>"
    )


def _reasons(entries: Any, what: str) -> str:
    if not isinstance(entries, list) or not entries:
        return ""
    rows = [
        [
            _e(e.get("node_id", "–")),
            _e(e.get("partition_id", "–")),
            _e(e.get("reason", "")),
        ]
        for e in entries[:LIST_ROWS]
        if isinstance(e, dict)
    ]
    table = _table(["node#", "partition#", "reason"], rows, "reasons", f"{what}-table")
    return (
        f"<details open><summary>{len(entries)} {what}</summary>{table}</details>"
        if len(entries) <= 20
        else f"<details><summary>{len(entries)} {what}</summary>{table}</details>"
    )


def _closed(fleet: dict[str, Any]) -> str:
    why = fleet.get("closed_reason")
    return _e(CLOSED.get(why, why) if isinstance(why, str) else "–")


def _fleet(res: dict[str, Any]) -> str:
    fleet = _dict(res, "fleet")
    window = _num(fleet.get("window_s"))
    rows = [
        ("window", f"{_secs(window)}, closed: {_closed(fleet)}"),
        (
            "asked",
            f"{len(fleet.get('asked') or [])} nodes ({_e(fleet.get('times_asked', '–'))} asks)",
        ),
    ]
    for key in ("valid", "rejected", "missing", "late", "lost_contact"):
        ids = fleet.get(key) or []
        listed = f"<small>{_ids(ids)}</small>"
        if len(ids) > 30:  # a fleet: the node ids collapsed
            listed = f"<details><summary>node ids</summary>{listed}</details>"
        rows.append((key.replace("_", " "), f"{len(ids)} {listed}"))
    return (
        '<section id="fleet"><h2>Collection window</h2>'
        + _kv(rows)
        + _reasons(res.get("rejected"), "rejected")
        + _reasons(res.get("missing"), "missing")
        + "</section>"
    )


def _communication(res: dict[str, Any]) -> str:
    rows = [
        ("upload, all clients", _bytes(res.get("upload_bytes_total"))),
        ("upload per client (mean)", _bytes(res.get("upload_bytes_per_client"))),
        ("upload per class", _bytes(res.get("upload_bytes_per_class"))),
        ("download per client", _bytes(res.get("download_bytes_per_client"))),
    ]
    down = res.get("download_bytes")
    if isinstance(down, dict):
        rows += [(f"&nbsp;&nbsp;{_e(k)} message", _bytes(v)) for k, v in down.items()]
    return (
        '<section id="communication"><h2>Communication</h2>' + _kv(rows) + "</section>"
    )


def _synth_budget(res: dict[str, Any]) -> str:
    sb = res.get("synth_budget")
    if not isinstance(sb, dict):
        return ""
    rows = [(_e(k), _e(v)) for k, v in sb.items() if not isinstance(v, dict | list)]
    reps = sb.get("representatives")
    if isinstance(reps, dict) and reps:
        names = _list(res, "class_names")

        def name(k: Any) -> str:
            i = int(k) if str(k).isdigit() else None
            return str(names[i]) if i is not None and i < len(names) else str(k)

        rows.append(
            (
                "conditioning rows per class",
                ", ".join(
                    f"{_e(name(k))}: {_e(v)}" for k, v in list(reps.items())[:LIST_ROWS]
                ),
            )
        )
    return (
        '<section id="synth-budget"><h2>Synthesis budget</h2>'
        + _kv(rows)
        + "</section>"
    )


def _timings(res: dict[str, Any]) -> str:
    t = res.get("timings_s")
    if not isinstance(t, dict) or not t:
        return ""
    total = _num(t.get("total")) or max((_num(v) or 0 for v in t.values()), default=0)
    rows = [
        [_e(k), _secs(v), _bar((_num(v) or 0) / total if total else None)]
        for k, v in sorted(t.items(), key=lambda kv: kv[0] == "total")
    ]
    return (
        '<section id="timings"><h2>Timings</h2>'
        + _table(["step", "time#", "share of total"], rows, "timings")
        + "</section>"
    )


def _method_results(res: dict[str, Any]) -> str:
    """What the method adds to results.json (``summary``, ``extra``), as it is."""
    rest = {k: v for k, v in res.items() if k not in SHOWN_ELSEWHERE}
    if not rest:
        return ""
    rows = []
    for k, v in rest.items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        text = text if len(text) <= 400 else text[:400] + f"… (+{len(text) - 400})"
        rows.append((_e(k), f"<code>{_e(text)}</code>"))
    return (
        '<section id="method-results"><h2>Method results</h2>'
        + _kv(rows)
        + "</section>"
    )


def _config(res: dict[str, Any]) -> str:
    cfg = _dict(res, "config")
    if not cfg:
        return ""
    rows = [
        (_e(k), f"<code>{_e(json.dumps(v, default=str))}</code>")
        for k, v in sorted(cfg.items())
    ]
    return (
        f'<section id="config"><details><summary>Config ({len(cfg)} keys, '
        f"validated)</summary>{_kv(rows)}</details></section>"
    )


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
