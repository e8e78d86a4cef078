"""report.html: one self-contained page of one run's results.

Everything on the page comes from the results dict (what results.json holds)
and the plots' PNG files, embedded as base64 ``<img>``: inline CSS, no script,
no external resource, ``<details>`` for what is collapsed. Every value is
HTML-escaped on its way in (``html_blocks.esc``): a client's domain, its
rejection reason, a metric name can hold anything, and a page must not run what
a client sent. The building blocks (tables, bars, number formats, the CSS) are in
``server_app.html_blocks``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from .html_blocks import (
    CSS,
    LIST_ROWS,
    bar_html,
    dict_of,
    esc,
    finite,
    fmt_bytes,
    fmt_ids,
    fmt_pct,
    fmt_secs,
    html_table,
    kv_table,
    list_of,
)
from .persist import atomic_write_bytes

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
    title = f"{esc(res.get('method'))} on {esc(res.get('dataset'))}"
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


# ---------------------------------------------------------------- sections


def _header(res: dict[str, Any]) -> str:
    cfg = dict_of(res, "config")
    bits = [
        f"partition {esc(res.get('partition'))}",
        f"device {esc(res.get('device'))}",
        f"seed {esc(cfg.get('seed', '–'))}",
    ]
    if cfg.get("run-name"):
        bits.insert(0, f"run {esc(cfg['run-name'])}")
    return (
        f'<header><p class="kicker">One-shot federated learning: run report</p>'
        f"<h1>{esc(res.get('method'))} <span>on</span> {esc(res.get('dataset'))}</h1>"
        f'<p class="sub">{" · ".join(bits)}</p></header>'
    )


def _card(cid: str, label: str, value: str, note: str = "", main: bool = False) -> str:
    return (
        f'<div class="card{" main" if main else ""}" id="{cid}">'
        f'<div class="label">{label}</div><div class="value">{value}</div>'
        f'<div class="note">{note}</div></div>'
    )


def _headline(res: dict[str, Any]) -> str:
    fleet = dict_of(res, "fleet")
    about = dict_of(res, "global_test")
    size = finite(res.get("global_test_size")) or 0
    if finite(res.get("global_accuracy")) is not None:
        by = about.get("evaluated_by")
        g_note = f"{size:,.0f} test images" + (f" · {esc(by)}" if by else "")
    else:
        g_note = f"not measured: {esc(about.get('reason') or 'no global model')}"
    asked = len(fleet.get("asked") or [])
    counts = [f"{asked} asked"] if asked else []
    for key in ("rejected", "missing", "late"):
        n = len(fleet.get(key) or res.get(key) or [])
        counts.append(f'<span class="{key if n else ""}">{n} {key}</span>')
    timings = dict_of(res, "timings_s")
    cards = [
        _card(
            "global-accuracy",
            "global accuracy",
            fmt_pct(res.get("global_accuracy")),
            g_note,
            main=True,
        ),
        _card(
            "mean-client-accuracy",
            "mean client accuracy",
            fmt_pct(res.get("mean_accuracy")),
            "each client's held-out test set",
        ),
        _card(
            "num-clients",
            "clients used",
            esc(res.get("num_clients")),
            " · ".join(counts),
        ),
        _card(
            "upload-per-client",
            "upload per client",
            fmt_bytes(res.get("upload_bytes_per_client")),
            f"{fmt_bytes(res.get('upload_bytes_total'))} in all · "
            f"{fmt_bytes(res.get('upload_bytes_per_class'))} per class",
        ),
        _card(
            "total-time",
            "server time",
            fmt_secs(timings.get("total")),
            f"collection closed: {_closed(fleet)}",
        ),
    ]
    if finite(res.get("mean_fid_proxy")) is not None:
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
                f'<div class="chip"><span class="dom">{esc(d)}</span>'
                f'<span class="acc">{fmt_pct(a)}</span>{bar_html(a)}</div>'
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
    return f'<span class="badge {cls}">{esc(s)}</span>'


def _client_rows(clients: list[dict[str, Any]]) -> list[list[str]]:
    def key(c: dict[str, Any]) -> tuple[bool, float]:
        pid = finite(c.get("partition_id"))
        return (pid is None, pid or 0.0)

    return [
        [
            esc("–" if c.get("partition_id") is None else c["partition_id"]),
            esc(c.get("node_id", "–")),
            esc(c.get("domain") or "–"),
            esc(f"{c.get('num_examples') or 0:,}"),
            esc(fmt_bytes(c.get("upload_bytes"))),
            f"{fmt_pct(c.get('accuracy'))} {bar_html(c.get('accuracy'))}",
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
    full = html_table(CLIENT_HEAD, _client_rows(clients), "clients", "clients-table")
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
    per_domain = dict_of(res, "global_accuracy_per_domain")
    order = sorted(by, key=lambda d: (-len(by[d]), d))
    # (label, global accuracy, clients); a domain is whatever a client says, so
    # above DOMAIN_ROWS domains the smallest are pooled in one row
    groups = [(esc(d), per_domain.get(d), by[d]) for d in order[:DOMAIN_ROWS]]
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
        accs = [a for c in used if (a := finite(c.get("accuracy"))) is not None]
        mean = sum(accs) / len(accs) if accs else None
        rows.append(
            [
                label,
                str(len(cs)),
                str(len(used)),
                str(len(cs) - len(used)),
                esc(f"{sum(finite(c.get('num_examples')) or 0 for c in cs):,.0f}"),
                fmt_bytes(sum(finite(c.get("upload_bytes")) or 0 for c in cs)),
                f"{fmt_pct(mean)} {bar_html(mean)}",
                fmt_pct(global_acc),
            ]
        )
    summary = html_table(
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
            esc(e.get("node_id", "–")),
            esc(e.get("partition_id", "–")),
            esc(e.get("reason", "")),
        ]
        for e in entries[:LIST_ROWS]
        if isinstance(e, dict)
    ]
    table = html_table(
        ["node#", "partition#", "reason"], rows, "reasons", f"{what}-table"
    )
    return (
        f"<details open><summary>{len(entries)} {what}</summary>{table}</details>"
        if len(entries) <= 20
        else f"<details><summary>{len(entries)} {what}</summary>{table}</details>"
    )


def _closed(fleet: dict[str, Any]) -> str:
    why = fleet.get("closed_reason")
    return esc(CLOSED.get(why, why) if isinstance(why, str) else "–")


def _fleet(res: dict[str, Any]) -> str:
    fleet = dict_of(res, "fleet")
    window = finite(fleet.get("window_s"))
    rows = [
        ("window", f"{fmt_secs(window)}, closed: {_closed(fleet)}"),
        (
            "asked",
            f"{len(fleet.get('asked') or [])} nodes ({esc(fleet.get('times_asked', '–'))} asks)",
        ),
    ]
    for key in ("valid", "rejected", "missing", "late", "lost_contact"):
        ids = fleet.get(key) or []
        listed = f"<small>{fmt_ids(ids)}</small>"
        if len(ids) > 30:  # a fleet: the node ids collapsed
            listed = f"<details><summary>node ids</summary>{listed}</details>"
        rows.append((key.replace("_", " "), f"{len(ids)} {listed}"))
    return (
        '<section id="fleet"><h2>Collection window</h2>'
        + kv_table(rows)
        + _reasons(res.get("rejected"), "rejected")
        + _reasons(res.get("missing"), "missing")
        + "</section>"
    )


def _communication(res: dict[str, Any]) -> str:
    rows = [
        ("upload, all clients", fmt_bytes(res.get("upload_bytes_total"))),
        ("upload per client (mean)", fmt_bytes(res.get("upload_bytes_per_client"))),
        ("upload per class", fmt_bytes(res.get("upload_bytes_per_class"))),
        ("download per client", fmt_bytes(res.get("download_bytes_per_client"))),
    ]
    down = res.get("download_bytes")
    if isinstance(down, dict):
        rows += [
            (f"&nbsp;&nbsp;{esc(k)} message", fmt_bytes(v)) for k, v in down.items()
        ]
    return (
        '<section id="communication"><h2>Communication</h2>'
        + kv_table(rows)
        + "</section>"
    )


def _synth_budget(res: dict[str, Any]) -> str:
    sb = res.get("synth_budget")
    if not isinstance(sb, dict):
        return ""
    rows = [(esc(k), esc(v)) for k, v in sb.items() if not isinstance(v, dict | list)]
    reps = sb.get("representatives")
    if isinstance(reps, dict) and reps:
        names = list_of(res, "class_names")

        def name(k: Any) -> str:
            i = int(k) if str(k).isdigit() else None
            return str(names[i]) if i is not None and i < len(names) else str(k)

        rows.append(
            (
                "conditioning rows per class",
                ", ".join(
                    f"{esc(name(k))}: {esc(v)}"
                    for k, v in list(reps.items())[:LIST_ROWS]
                ),
            )
        )
    return (
        '<section id="synth-budget"><h2>Synthesis budget</h2>'
        + kv_table(rows)
        + "</section>"
    )


def _timings(res: dict[str, Any]) -> str:
    t = res.get("timings_s")
    if not isinstance(t, dict) or not t:
        return ""
    total = finite(t.get("total")) or max(
        (finite(v) or 0 for v in t.values()), default=0
    )
    rows = [
        [esc(k), fmt_secs(v), bar_html((finite(v) or 0) / total if total else None)]
        for k, v in sorted(t.items(), key=lambda kv: kv[0] == "total")
    ]
    return (
        '<section id="timings"><h2>Timings</h2>'
        + html_table(["step", "time#", "share of total"], rows, "timings")
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
        rows.append((esc(k), f"<code>{esc(text)}</code>"))
    return (
        '<section id="method-results"><h2>Method results</h2>'
        + kv_table(rows)
        + "</section>"
    )


def _config(res: dict[str, Any]) -> str:
    cfg = dict_of(res, "config")
    if not cfg:
        return ""
    rows = [
        (esc(k), f"<code>{esc(json.dumps(v, default=str))}</code>")
        for k, v in sorted(cfg.items())
    ]
    return (
        f'<section id="config"><details><summary>Config ({len(cfg)} keys, '
        f"validated)</summary>{kv_table(rows)}</details></section>"
    )
