"""The per-client table the server logs: one row per client, or above
``TABLE_ROWS`` clients a summary by domain (results.json keeps every client).
Client text is escaped and truncated (``safe_text``)."""

from __future__ import annotations

from typing import Any

from common.contract import safe_text

TABLE_ROWS = 20  # above this many clients the log summarizes them by domain


def client_order(c: dict[str, Any]) -> tuple[bool, int]:
    """Sort key of a results.json client entry: by partition id, entries without
    a valid one (``True`` first) last."""
    pid = c.get("partition_id")
    ok = isinstance(pid, int) and not isinstance(pid, bool)
    return (not ok, pid if ok else 0)  # type: ignore[return-value]


def format_domain_table(clients: list[dict[str, Any]]) -> str:
    """The per-client table summarized by domain (fleets; results.json keeps all)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for c in clients:
        by.setdefault(safe_text(c.get("domain") or "-", 20), []).append(c)
    head = (
        f"{'domain':>12} {'clients':>7} {'used':>5} {'excluded':>8} "
        f"{'examples':>9} {'upload B':>11} {'mean acc':>8}"
    )
    rows = [head, "-" * len(head)]
    for d in sorted(by):
        cs = by[d]
        used = [c for c in cs if c.get("status") in ("ok", "no evaluation")]
        accs = [c["accuracy"] for c in used if isinstance(c.get("accuracy"), float)]
        acc_s = f"{sum(accs) / len(accs):8.4f}" if accs else f"{'-':>8}"
        rows.append(
            f"{d:>12} {len(cs):>7} {len(used):>5} {len(cs) - len(used):>8} "
            f"{sum(c.get('num_examples', 0) for c in cs):>9} "
            f"{sum(c.get('upload_bytes', 0) for c in cs):>11} {acc_s}"
        )
    excluded: dict[str, int] = {}
    for c in clients:
        status = str(c.get("status", ""))
        if status.startswith("excluded"):
            key = status[:80]
            excluded[key] = excluded.get(key, 0) + 1
    for why, n in sorted(excluded.items(), key=lambda kv: -kv[1])[:10]:
        rows.append(f"  {n} x {why}")
    rows.append(f"({len(clients)} clients; each is listed in results.json)")
    return "\n".join(rows)


def format_table(clients: list[dict[str, Any]]) -> str:
    """The per-client table: partition, node, domain, examples, upload,
    accuracy and status, sorted by partition."""
    head = f"{'partition':>9} {'node':>20} {'domain':>9} {'examples':>8} {'upload B':>9} {'accuracy':>8}  status"
    rows = [head, "-" * len(head)]
    for c in sorted(clients, key=client_order):
        acc = c.get("accuracy")
        acc_s = f"{acc:8.4f}" if isinstance(acc, float) else f"{'-':>8}"
        rows.append(
            f"{'-' if client_order(c)[0] else c['partition_id']:>9} "
            f"{str(c.get('node_id', '-')):>20} "
            f"{safe_text(c.get('domain', '-'), 20):>9} {c.get('num_examples', 0):>8} "
            f"{c.get('upload_bytes', 0):>9} {acc_s}  {c.get('status', '')}"
        )
    return "\n".join(rows)
