"""The one-shot round, as numbered steps in one place.

    0. check the config against the models -> 1. wait for nodes
    -> 2. send the collect message -> 3. collect replies -> 4. validate
    -> 5. persist -> 6. server work -> 7. push back and evaluate
    -> 7b. evaluate on the global test set -> 8. report

There is no second round: clients are asked for their upload exactly once. The
round names no method and no dataset: it calls the method's interface
(``methods.base.OneShotMethod``) and the dataset registry (``common.datasets``).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
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
from common.datasets import (
    GLOBAL_METRIC,
    GLOBAL_SIZE_METRIC,
    GLOBAL_TEST_PER_CLASS,
    NO_GLOBAL_TEST,
    DatasetInfo,
    dataset_info,
    global_test_set,
    participating_domains,
)
from methods import get_method
from methods.base import OneShotMethod, ServerContext, ServerOutput

from . import persist, results


class RoundError(RuntimeError):
    """The round cannot go on (too few valid clients, no nodes)."""


@dataclass
class Collected:
    replies: list[Reply] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, node: int, reason: str, partition_id: Any = None) -> None:
        entry: dict[str, Any] = {"node_id": int(node), "reason": reason}
        if isinstance(partition_id, int) and not isinstance(partition_id, bool):
            entry["partition_id"] = partition_id
        self.rejected.append(entry)
        log(WARNING, "Rejected node %s (partition %s): %s", node, partition_id, reason)


def run_dir_for(cfg: RunConfig, run_id: int | str) -> Path:
    """``<output-dir>/<run-name or run id>``; never outside ``output-dir``."""
    root = Path(cfg.output_dir).expanduser().resolve()
    run_dir = (root / (cfg.run_name or str(run_id))).resolve()
    if run_dir.parent != root:
        raise RoundError(f"run folder {run_dir} is not inside output-dir {root}")
    return run_dir


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


def unpack_replies(
    method: OneShotMethod, sent: list[int], raw: list[Message], ctx: ServerContext
) -> Collected:
    """Envelopes of the raw replies, in node order; one reply per node counts."""
    out = Collected()
    by_node: dict[int, list[Message]] = defaultdict(list)
    for msg in raw:
        by_node[int(msg.metadata.src_node_id)].append(msg)
    for node in sorted(by_node):
        msg = by_node[node][0]
        if len(by_node[node]) > 1:
            log(WARNING, "Node %s replied %d times; only its first reply counts",
                node, len(by_node[node]))  # fmt: skip
        if msg.has_error():
            out.reject(node, f"client error {msg.error.code}: "
                       f"{C.safe_text(msg.error.reason, 300)}")  # fmt: skip
            continue
        try:
            out.replies.append(
                C.unpack_reply(
                    node, msg.content, method.payload_key, ctx.max_upload_bytes
                )
            )
        except PayloadError as e:
            out.reject(node, str(e), _claimed_partition(msg))
    for node in sorted(set(sent) - set(by_node)):
        out.missing.append(
            {"node_id": node, "reason": "no reply within round-timeout-s"}
        )
        log(WARNING, "No reply from node %s", node)
    return out


def _claimed_partition(msg: Message) -> Any:
    try:
        return msg.content.config_records[C.KEY_META].get("partition-id")
    except Exception:
        return None


def learn_classes(ctx: ServerContext, replies: list[Reply]) -> DatasetInfo:
    """The dataset registry's classes, or the plurality over validated envelopes."""
    if ctx.info is not None:
        return ctx.info
    votes = Counter(
        (r.class_names, r.channels) for r in replies if r.class_names and r.channels
    )
    if not votes:
        raise RoundError(
            f"dataset={ctx.cfg.dataset!r} does not name its classes and no valid "
            "reply reported them"
        )
    # plurality; ties go to the first in sorted order, so arrival order never decides
    best = max(votes.values())
    names, channels = min(k for k, v in votes.items() if v == best)
    return DatasetInfo(ctx.cfg.dataset, names, int(channels))  # type: ignore[arg-type]


def screen(method: OneShotMethod, ctx: ServerContext, got: Collected) -> Collected:
    """Cross-checks and the method's validation of replies whose envelope is valid.

    Used on fresh replies and again on persisted ones when a run resumes.
    """
    out = Collected(rejected=list(got.rejected), missing=list(got.missing))
    # A partition id claimed by two nodes: neither can be trusted with it.
    claims: dict[int, list[int]] = defaultdict(list)
    for r in got.replies:
        claims[r.partition_id].append(r.node_id)
    candidates = []
    for r in got.replies:
        if len(claims[r.partition_id]) > 1:
            out.reject(r.node_id, f"partition-id {r.partition_id} is claimed by nodes "
                       f"{sorted(claims[r.partition_id])}; all claims rejected",
                       r.partition_id)  # fmt: skip
        else:
            candidates.append(r)
    ctx.info = learn_classes(ctx, candidates)
    for r in candidates:
        try:
            if r.class_names is not None and r.class_names != ctx.info.class_names:
                raise PayloadError(
                    f"class-names {C.safe_text(','.join(r.class_names))!r} disagree "
                    f"with the dataset's {C.safe_text(','.join(ctx.info.class_names))!r}"
                )
            if r.channels is not None and r.channels != ctx.info.channels:
                raise PayloadError(
                    f"channels={r.channels}, the dataset has {ctx.info.channels}"
                )
            method.validate(r, ctx)
        except PayloadError as e:
            out.reject(r.node_id, str(e), r.partition_id)
            continue
        except Exception as e:  # a validator bug must not end the round either
            out.reject(r.node_id, f"validation failed: {e.__class__.__name__}: "
                       f"{C.safe_text(e)}", r.partition_id)  # fmt: skip
            continue
        out.replies.append(r)
    out.replies.sort(key=lambda r: r.partition_id)
    return out


def clients_global_accuracy(
    metrics: list[dict[str, float]], domains: tuple[str, ...]
) -> tuple[float | None, dict[str, float], int]:
    """Mean over clients of their own models' ``global-accuracy`` (overall, per
    domain of ``domains``) and the set's size; ``None`` if no client measured it."""
    accs = [m[GLOBAL_METRIC] for m in metrics if GLOBAL_METRIC in m]
    per_domain = {}
    for d in domains:
        got = [
            m[f"{GLOBAL_METRIC}/{d}"] for m in metrics if f"{GLOBAL_METRIC}/{d}" in m
        ]
        if got:
            per_domain[d] = sum(got) / len(got)
    # every client evaluates the same set (global_test_set is a function of the config)
    size = max((int(m.get(GLOBAL_SIZE_METRIC, 0)) for m in metrics), default=0)
    return (sum(accs) / len(accs) if accs else None), per_domain, size


def evaluate_global(
    method: OneShotMethod,
    ctx: ServerContext,
    got: Collected,
    out: ServerOutput,
    evals: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    """Accuracy on the global test set: the dataset's test split in the domain of
    every accepted client, balanced over classes.

    The global model is evaluated here, on the server device. A method without
    one (no federation) reports each client's own model on the same set; the
    report holds their mean. The entries are results.json's ``global_*`` keys.
    """
    domains = participating_domains(
        ctx.info, [r.meta.get("domain") for r in got.replies]
    )
    res: dict[str, Any] = {
        "global_accuracy": None,
        "global_accuracy_per_domain": {},
        "global_test_size": 0,
        "global_test": {
            "domains": list(domains),
            "per_class": GLOBAL_TEST_PER_CLASS,
            "evaluated_by": None,
            "reason": None,
        },
    }
    about = res["global_test"]
    if out.model_state is None:
        metrics = [
            evals.get(r.node_id, r.metrics if method.evaluate_type is None else {})
            for r in got.replies
        ]
        acc, per_domain, size = clients_global_accuracy(metrics, domains)
        n = sum(GLOBAL_METRIC in m for m in metrics)
        about["evaluated_by"] = f"clients: each its own model, mean over {n}"
        if acc is None:
            about["reason"] = (
                f"no global model, and no client reported {GLOBAL_METRIC!r} for its "
                f"own (a client reports none when {NO_GLOBAL_TEST})"
            )
        res |= {
            "global_accuracy": acc,
            "global_accuracy_per_domain": per_domain,
            "global_test_size": size,
        }
        return res
    if not domains:
        about["reason"] = "no accepted client reported a domain of the dataset"
        return res
    try:
        test = global_test_set(ctx.cfg.data_args(), domains, GLOBAL_TEST_PER_CLASS)
    except (ValueError, OSError) as e:  # evaluation must not lose the server work
        about["reason"] = f"global test set: {e.__class__.__name__}: {C.safe_text(e)}"
        log(WARNING, "No global accuracy: %s", about["reason"])
        return res
    if test is None:
        about["reason"] = NO_GLOBAL_TEST
        return res
    from common.models import build_classifier
    from common.train import predict

    model = build_classifier(out.arch, ctx.channels, ctx.num_classes)
    model.load_state_dict(out.model_state)
    acc, per_domain = test.score(predict(model, test.images, device=ctx.device))
    about["evaluated_by"] = "server: the global model"
    return res | {
        "global_accuracy": acc,
        "global_accuracy_per_domain": per_domain,
        "global_test_size": len(test),
    }


def run_one_shot(grid: Grid, cfg: RunConfig, run_id: int | str) -> dict[str, Any]:
    """Run the whole one-shot round; returns the results dict (also written to disk)."""
    t_start = time.perf_counter()
    method = get_method(cfg.method)
    run_dir = run_dir_for(cfg, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = ServerContext(cfg=cfg, run_dir=run_dir, info=dataset_info(cfg.data_args()))
    timings: dict[str, float] = {}
    download: dict[str, int] = {}  # bytes sent to each node, by message
    log(INFO, "One-shot round: method=%s, run dir %s", method.name, run_dir)

    # 0. Fail fast on a config the method cannot run (before any client works)
    method.check(ctx)

    resumed = persist.load_uploads(run_dir, method.name) if cfg.run_name else None
    if resumed is not None:
        log(INFO, "Resuming from %d persisted uploads: no client is asked again",
            len(resumed[0]))  # fmt: skip
        got = screen(method, ctx, Collected(*resumed))
        timings["collect"] = 0.0
        download["collect"] = 0
    else:
        t0 = time.perf_counter()
        # 1. Wait for at least min-clients nodes
        nodes = wait_for_nodes(grid, cfg.min_clients, cfg.wait_for_nodes_s)
        log(INFO, "%d nodes connected", len(nodes))
        # 2. Send the collect message with the method's instructions
        content = method.collect_content(ctx)
        download["collect"] = C.record_nbytes(content)
        msgs = [
            Message(content, dst_node_id=n, message_type=method.collect_type)
            for n in nodes
        ]
        # 3. Collect replies until all arrived or round-timeout-s passed
        raw = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout_s))
        # 4. Validate: envelopes, then cross-checks, classes and the method's checks
        got = screen(method, ctx, unpack_replies(method, nodes, raw, ctx))
        timings["collect"] = time.perf_counter() - t0
        # 5. Persist the accepted uploads before any server work
        persist.save_uploads(
            run_dir, method.name, got.replies, got.rejected, got.missing
        )
    if len(got.replies) < cfg.min_clients:
        raise RoundError(
            f"{len(got.replies)} valid replies < min-clients={cfg.min_clients}; "
            f"rejected: {got.rejected}; missing: {got.missing}"
        )

    # 6. Server work (synthesize and train, merge, aggregate), checkpointed
    out = persist.load_output(run_dir) if cfg.run_name else None
    if out is not None:
        log(INFO, "Loaded the persisted server output: server work is not repeated")
    else:
        out = method.server_work(got.replies, ctx)
        persist.save_output(run_dir, out)
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
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                log(WARNING, "Evaluation failed on node %s: %s", node,
                    C.safe_text(msg.error.reason, 300))  # fmt: skip
                continue
            try:
                r = C.unpack_reply(node, msg.content, None, ctx.max_upload_bytes)
            except PayloadError as e:
                log(WARNING, "Bad evaluation reply from node %s: %s", node, e)
                continue
            evals[node] = r.metrics | {
                "partition_id": r.partition_id,
                "domain": C.safe_text(r.meta.get("domain", ""), 40),
            }
        timings["evaluate"] = time.perf_counter() - t0

    # 7b. Evaluate the global model on the global test set (every participating
    # domain, balanced over classes: the clients' splits carry their label skew)
    t0 = time.perf_counter()
    global_eval = evaluate_global(method, ctx, got, out, evals)
    timings["global_evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    # 8. Report: results.json, plots and the per-client table
    return results.report(method, ctx, got, out, evals, timings, download, global_eval)
