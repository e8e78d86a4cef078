"""The one-shot round, as numbered steps in one place.

    1. wait for nodes -> 2. send the round config -> 3. collect replies
    -> 4. validate -> 5. persist -> 6. server work (synthesize/merge, train)
    -> 7. push the global model back and collect evaluations -> 8. report

There is no second round: clients are asked for their upload exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import contract as C
from common.config import RunConfig
from common.contract import PayloadError, Reply
from common.data import DIGIT_NAMES

from . import persist, results
from .context import ServerContext, ServerOutput
from .methods import OneShotMethod, get_method


class RoundError(RuntimeError):
    """The round cannot go on (too few valid clients, no nodes)."""


@dataclass
class Collected:
    replies: list[Reply] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)


def run_dir_for(cfg: RunConfig, run_id: int | str) -> Path:
    name = cfg.run_name or str(run_id)
    return (Path(cfg.output_dir).expanduser() / name).resolve()


def wait_for_nodes(grid: Grid, min_nodes: int, timeout_s: float) -> list[int]:
    """Wait until ``min_nodes`` SuperNodes are connected (or the timeout passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            return nodes
        if time.monotonic() >= deadline:
            raise RoundError(
                f"only {len(nodes)} node(s) connected after wait-for-nodes-s={timeout_s}; "
                f"min-clients={min_nodes}"
            )
        log(INFO, "Waiting for nodes: %d connected, %d required", len(nodes), min_nodes)
        time.sleep(1.0)


def validate_replies(
    method: OneShotMethod,
    sent: dict[int, str],
    raw: list[Message],
    ctx: ServerContext,
) -> Collected:
    """Keep valid replies; record a reason for every rejected or missing node."""
    out = Collected()
    seen: set[int] = set()
    partitions: set[int] = set()
    for msg in raw:
        node = int(msg.metadata.src_node_id)
        seen.add(node)
        if msg.has_error():
            reason = f"client error {msg.error.code}: {msg.error.reason}"
            out.rejected.append({"node_id": node, "reason": reason})
            log(WARNING, "Rejected node %s: %s", node, reason)
            continue
        try:
            reply = C.unpack_reply(node, msg.content, method.payload_key)
            if reply.partition_id in partitions:
                raise PayloadError(
                    f"partition-id {reply.partition_id} already received"
                )
            method.validate(reply, ctx)
        except PayloadError as e:
            meta = msg.content.config_records.get(C.KEY_META)
            pid = meta.get("partition-id") if meta is not None else None
            out.rejected.append(
                {"node_id": node, "partition_id": pid, "reason": str(e)}
            )
            log(WARNING, "Rejected node %s (partition %s): %s", node, pid, e)
            continue
        partitions.add(reply.partition_id)
        out.replies.append(reply)
    for node in sorted(set(sent) - seen):
        out.missing.append(
            {"node_id": node, "reason": "no reply within round-timeout-s"}
        )
        log(WARNING, "No reply from node %s", node)
    return out


def dataset_info(cfg: RunConfig, replies: list[Reply]) -> tuple[int, list[str], int]:
    """``(num_classes, class_names, channels)`` known statically or agreed by clients."""
    if cfg.dataset in ("mnist", "mnist-domains"):
        return 10, list(DIGIT_NAMES), 1
    votes = Counter(
        (str(r.meta.get("class-names", "")), int(r.meta.get("channels", 1)))  # type: ignore[call-overload]
        for r in replies
    )
    if not votes:
        raise RoundError("no client reported its classes")
    (names, channels), _ = votes.most_common(1)[0]
    class_names = names.split(",")
    return len(class_names), class_names, channels


def run_one_shot(grid: Grid, cfg: RunConfig, run_id: int | str) -> dict[str, Any]:
    """Run the whole one-shot round; returns the results dict (also written to disk)."""
    t_start = time.perf_counter()
    method = get_method(cfg.method)
    run_dir = run_dir_for(cfg, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = ServerContext(cfg=cfg, run_dir=run_dir)
    if cfg.dataset in ("mnist", "mnist-domains"):
        ctx.num_classes, ctx.class_names, ctx.channels = dataset_info(cfg, [])
    timings: dict[str, float] = {}
    download: dict[str, int] = {}  # bytes sent to each node, by message
    log(INFO, "One-shot round: method=%s, run dir %s", method.name, run_dir)

    # 0. Fail fast on a config the method cannot run (before any client works)
    method.check(ctx)

    resumed = persist.load_uploads(run_dir) if cfg.run_name else None
    if resumed is not None:
        got = Collected(*resumed)
        log(
            INFO,
            "Resuming from %d persisted uploads: no client is asked again",
            len(got.replies),
        )
        timings["collect"] = 0.0
        download["collect"] = 0
    else:
        t0 = time.perf_counter()
        # 1. Wait for at least min-clients nodes
        nodes = wait_for_nodes(grid, cfg.min_clients, cfg.wait_for_nodes_s)
        log(INFO, "%d nodes connected", len(nodes))
        # 2. Send the round config (and, for fedavg, the initial weights)
        content = method.collect_content(ctx)
        download["collect"] = C.record_nbytes(content)
        msgs = [
            Message(content, dst_node_id=n, message_type=method.collect_type)
            for n in nodes
        ]
        # 3. Collect replies until all arrived or round-timeout-s passed
        raw = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout_s))
        # 4. Validate each payload; record why a client is dropped
        if cfg.dataset not in ("mnist", "mnist-domains"):
            ok = [C.unpack_reply(int(m.metadata.src_node_id), m.content, None)
                  for m in raw if not m.has_error()]  # fmt: skip
            ctx.num_classes, ctx.class_names, ctx.channels = dataset_info(cfg, ok)
        got = validate_replies(
            method, {n: method.collect_type for n in nodes}, raw, ctx
        )
        timings["collect"] = time.perf_counter() - t0
        # 5. Persist the accepted uploads before any server work
        persist.save_uploads(run_dir, got.replies, got.rejected, got.missing)
    if len(got.replies) < cfg.min_clients:
        raise RoundError(
            f"{len(got.replies)} valid replies < min-clients={cfg.min_clients}; "
            f"rejected: {got.rejected}; missing: {got.missing}"
        )
    if cfg.dataset not in ("mnist", "mnist-domains"):
        ctx.num_classes, ctx.class_names, ctx.channels = dataset_info(cfg, got.replies)

    # 6. Server work: synthesize or merge, then train the global model
    checkpoint = persist.load_checkpoint(run_dir, "global") if cfg.run_name else None
    if checkpoint is not None:
        state, info = checkpoint
        out = ServerOutput(
            model_state=state, arch=info["arch"], extra=info.get("extra", {})
        )
        out.timings = info.get("timings", {})
        log(INFO, "Loaded the persisted global model: server work is not repeated")
    else:
        out = method.server_work(got.replies, ctx)
        if out.model_state is not None:
            persist.save_checkpoint(
                run_dir, "global", out.model_state,
                {"arch": out.arch, "extra": out.extra, "timings": out.timings},
            )  # fmt: skip
    timings.update(out.timings)

    # 7. Push the global model to every node and collect their evaluations
    evals: dict[int, dict[str, Any]] = {}  # by node id
    if method.evaluate_type is not None:
        t0 = time.perf_counter()
        content = method.push_content(out, ctx)
        download["push"] = C.record_nbytes(content)
        nodes = sorted(grid.get_node_ids())
        msgs = [
            Message(content, dst_node_id=n, message_type=method.evaluate_type)
            for n in nodes
        ]
        for msg in grid.send_and_receive(msgs, timeout=cfg.round_timeout_s):
            if msg.has_error():
                log(WARNING, "Evaluation failed on node %s: %s",
                    msg.metadata.src_node_id, msg.error.reason)  # fmt: skip
                continue
            try:
                r = C.unpack_reply(int(msg.metadata.src_node_id), msg.content, None)
            except PayloadError as e:
                log(WARNING, "Bad evaluation reply: %s", e)
                continue
            evals[r.node_id] = r.metrics | {
                "domain": r.meta.get("domain"),
                "partition_id": r.partition_id,
            }
        timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    # 8. Report: results.json, plots and the per-client table
    return report(method, cfg, ctx, got, out, evals, timings, download)


def report(
    method: OneShotMethod,
    cfg: RunConfig,
    ctx: ServerContext,
    got: Collected,
    out: ServerOutput,
    evals: dict[int, dict[str, Any]],
    timings: dict[str, float],
    download: dict[str, int] | None = None,
) -> dict[str, Any]:
    clients: list[dict[str, Any]] = []
    for r in got.replies:
        ev = evals.get(r.node_id, r.metrics if method.evaluate_type is None else {})
        acc = ev.get("accuracy")
        clients.append(
            {
                "partition_id": r.partition_id,
                "node_id": r.node_id,
                "domain": r.meta.get("domain"),
                "num_examples": r.num_examples,
                "upload_bytes": r.upload_bytes,
                "accuracy": float(acc) if acc is not None else None,
                "status": "ok" if acc is not None else "no evaluation",
                "metrics": r.metrics,
                "evaluation": {
                    k: v for k, v in ev.items() if k not in ("domain", "partition_id")
                },
            }
        )
    for bad in got.rejected + got.missing:
        ev = evals.get(bad["node_id"], {})
        pid = bad.get("partition_id", ev.get("partition_id"))
        clients.append(
            {
                "partition_id": pid,
                "node_id": bad["node_id"],
                "domain": ev.get("domain"),
                "num_examples": 0,
                "upload_bytes": 0,
                "accuracy": float(ev["accuracy"]) if "accuracy" in ev else None,
                "status": f"excluded: {bad['reason']}",
            }
        )
    accs = [c["accuracy"] for c in clients if c["accuracy"] is not None]
    uploads = [c["upload_bytes"] for c in clients if c["upload_bytes"]]
    n_classes_up = sum(
        len(r.tensors.get("class_ids", []))
        for r in got.replies
        if "class_ids" in r.tensors
    )
    fids = [
        c["evaluation"]["fid-proxy"]
        for c in clients
        if "fid-proxy" in c.get("evaluation", {})
    ]
    res: dict[str, Any] = {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "partition": cfg.partition,
        "num_clients": len(got.replies),
        "clients": clients,
        "rejected": got.rejected,
        "missing": got.missing,
        "mean_accuracy": sum(accs) / len(accs) if accs else None,
        "mean_fid_proxy": sum(fids) / len(fids) if fids else None,
        "upload_bytes_total": sum(uploads),
        "upload_bytes_per_client": sum(uploads) / len(uploads) if uploads else 0,
        "upload_bytes_per_class": (sum(uploads) / n_classes_up)
        if n_classes_up
        else None,
        # what each node receives: the round config (+ initial weights) and the push
        "download_bytes_per_client": sum((download or {}).values()),
        "download_bytes": dict(download or {}),
        "timings_s": {k: round(v, 3) for k, v in timings.items()}
        | {
            k: 0.0
            for k in ("collect", "synthesize", "train", "evaluate")
            if k not in timings
        },
        "config": cfg.to_flat() | {"num-classes": ctx.num_classes},
        "device": str(ctx.device),
        **out.extra,
    }
    results.write_results(ctx.run_dir, res)
    domains = {
        c["partition_id"]: c.get("domain") or ""
        for c in clients
        if isinstance(c["partition_id"], int)
    }
    results.plot_accuracy(ctx.run_dir, clients, f"{cfg.method} on {cfg.dataset}")
    results.plot_samples(ctx.run_dir, out.samples, ctx.class_names, domains)
    log(INFO, "\n%s", results.format_table(clients))
    log(INFO, "mean accuracy %s, upload %d B total; results in %s",
        res["mean_accuracy"], res["upload_bytes_total"], ctx.run_dir / "results.json")  # fmt: skip
    return res
