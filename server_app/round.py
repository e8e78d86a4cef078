"""The one-shot round, as numbered steps in one place.

    0. check the config against the models
    -> 1. collection window: ask each node as it connects, screen and persist
          each reply as it arrives (``server_app.collect``)
    -> 2. validate every persisted upload (the node's registered identity,
          ``server_app.identity``; cross-checks, the method's checks; with
          ``screen-outliers``, the cohort's plausibility screens)
    -> 3. server work (checkpointed; a global model that is not finite or not
          plausible is refused: the run stops, nothing is pushed)
    -> 4. evaluate on the global test set
    -> 5. report -> 6. push back to the contributors and take their evaluations
    -> 7. report again

There is no second round: a device is asked for its upload once (again only if
it lost contact before answering, or the server died before it answered). The
round names no method and no dataset: it calls the method's interface
(``methods.base.OneShotMethod``) and the dataset registry (``common.datasets``).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import contract as C
from common.config import ConfigError, RunConfig
from common.contract import PayloadError
from common.datasets import (
    GLOBAL_METRIC,
    GLOBAL_SIZE_METRIC,
    NO_GLOBAL_TEST,
    dataset_info,
    global_test_set,
    participating_domains,
)
from common.robust import global_model_problem
from methods import get_method
from methods.base import OneShotMethod, ServerContext, ServerOutput
from methods.initial import check_init

from . import artifacts, persist, results
from .collect import (
    POLL_S,
    Clock,
    Collected,
    RealClock,
    quiet_for,
    run_window,
    take_late,
)
from .identity import node_fingerprints
from .outputs import resolve_output_dir
from .screening import (  # noqa: F401  (re-exported: the round's step 2)
    RoundError,
    assign_client_ids,
    check_classes,
    learn_classes,
    load_registry,
    precheck,
    reject_outliers,
    screen,
)


def check_privacy(method: OneShotMethod, cfg: RunConfig) -> None:
    """Refuse ``dp-epsilon > 0`` for a method whose upload has no DP mechanism:
    a user who asks for privacy must never get an unprotected upload."""
    if (
        cfg.dp_epsilon > 0
        and method.payload_key is not None
        and not method.private_uploads
    ):
        from methods import METHODS

        private = ", ".join(n for n, m in METHODS.items() if m.private_uploads)
        raise ConfigError(
            f"dp-epsilon={cfg.dp_epsilon:g}: method={method.name!r} uploads without "
            f"differential privacy (no mechanism for its upload yet); use dp-epsilon=0, "
            f"or a method that has one: {private}"
        )


def run_dir_for(cfg: RunConfig, run_id: int | str) -> Path:
    """``<output-dir>/<run-name or run id>``, absolute; never outside ``output-dir``.

    A relative ``output-dir`` is resolved against the project directory the run
    came from, or refused (``ConfigError``) where Flower does not let the
    ServerApp know it (``server_app.outputs``).
    """
    root = resolve_output_dir(cfg.output_dir)
    run_dir = (root / (cfg.run_name or str(run_id))).resolve()
    if run_dir.parent != root:
        raise RoundError(f"run folder {run_dir} is not inside output-dir {root}")
    return run_dir


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
            "per_class": ctx.cfg.global_test_per_class,
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
        test = global_test_set(
            ctx.cfg.data_args(), domains, ctx.cfg.global_test_per_class
        )
    except (ValueError, OSError) as e:  # evaluation must not lose the server work
        about["reason"] = f"global test set: {e.__class__.__name__}: {C.safe_text(e)}"
        log(WARNING, "No global accuracy: %s", about["reason"])
        return res
    if test is None:
        about["reason"] = NO_GLOBAL_TEST
        return res
    from common.models import classifier_from_state
    from common.train import predict

    model = classifier_from_state(
        out.arch, out.model_state, ctx.channels, ctx.num_classes
    )
    acc, per_domain = test.score(predict(model, test.images, device=ctx.device))
    about["evaluated_by"] = "server: the global model"
    return res | {
        "global_accuracy": acc,
        "global_accuracy_per_domain": per_domain,
        "global_test_size": len(test),
    }


def run_one_shot(
    grid: Grid, cfg: RunConfig, run_id: int | str, clock: Clock | None = None
) -> dict[str, Any]:
    """Run the whole one-shot round; returns the results dict (also written to disk).

    ``clock``: wall-clock time and sleeping; by default the grid's own (the
    in-process harness has a virtual one), else the real clock.
    """
    clock = clock or getattr(grid, "clock", None) or RealClock()
    t_start = time.perf_counter()
    method = get_method(cfg.method)
    run_dir = run_dir_for(cfg, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = ServerContext(cfg=cfg, run_dir=run_dir, info=dataset_info(cfg.data_args()))
    timings: dict[str, float] = {}
    download: dict[str, int] = {}  # bytes sent to each node, by message
    log(INFO, "One-shot round: method=%s, run dir %s", method.name, run_dir)

    # 0. Fail fast on a config the method cannot run (before any client works)
    check_privacy(method, cfg)
    check_init(ctx)
    method.check(ctx)
    registry = load_registry(cfg)

    # 1. The collection window: each node asked as it connects, each reply
    # screened and persisted as it arrives; resumed from the journal if any
    journal = persist.Journal(run_dir, method.name, resume=bool(cfg.run_name))
    content = method.collect_content(ctx)
    download["collect"] = C.record_nbytes(content)
    window: dict[str, Any] = {"reason": "resumed after the close", "outstanding": {}}
    t0 = time.perf_counter()
    if journal.closed:
        log(
            INFO,
            "The collection window of this run closed before: no client is asked again",
        )
    else:
        window = run_window(
            grid,
            journal,
            content=content,
            message_type=method.collect_type,
            payload_key=method.payload_key,
            max_upload_bytes=ctx.max_upload_bytes,
            window_s=cfg.collect_window_s,
            target_clients=cfg.target_clients,
            quiet_s=quiet_for(grid, cfg.collect_quiet_s),
            precheck=precheck(method, ctx, registry),
            clock=clock,
        )
    timings["collect"] = time.perf_counter() - t0

    # 2. Validate every persisted upload: registered identity, cross-checks,
    # classes, the method's checks
    loaded = persist.load_uploads(run_dir, method.name)
    assert loaded is not None  # the window closed above
    keys = node_fingerprints(grid) if registry is not None else {}
    got = screen(method, ctx, Collected(*loaded), registry, keys)
    fleet = fleet_summary(journal, got)
    if len(got.replies) < cfg.min_clients:
        raise RoundError(
            f"{len(got.replies)} valid uploads < min-clients={cfg.min_clients} when "
            f"the collection window closed ({fleet['closed_reason']}); rejected: "
            f"{got.rejected}; missing: {got.missing}"
        )

    # 3. Server work (synthesize and train, merge, aggregate), checkpointed
    out = persist.load_output(run_dir) if cfg.run_name else None
    fresh = out is None
    if out is not None:
        log(INFO, "Loaded the persisted server output: server work is not repeated")
    else:
        out = method.server_work(got.replies, ctx)
    # A global model that is not finite or not plausible is refused: nothing is
    # kept, evaluated or pushed, and results.json says why (a run again with
    # other settings redoes the server work)
    push = method.push_content(out, ctx) if method.evaluate_type is not None else None
    problem = global_model_problem(
        global_records(out, push), [r.tensors for r in got.replies]
    )
    if problem is not None:
        timings.update(out.timings)
        out.extra["global_model_refused"] = problem
        results.report(
            method, ctx, got, out, {}, timings, download, None, fleet, final=False
        )
        raise RoundError(
            f"the global model is refused, nothing is pushed: {problem} (recorded "
            "in results.json as global_model_refused)"
        )
    if fresh:
        persist.save_output(run_dir, out)
    # the global model in the formats users' tools load (rewritten on a resume)
    artifacts.save_global_model(run_dir, out, ctx, method.name)
    timings.update(out.timings)
    if "init-s" in ctx.memo:  # the public init, trained in this process
        timings["init"] = round(ctx.memo["init-s"], 3)
    take_late(grid, journal, window["outstanding"], clock.time())

    # 4. Evaluate the global model on the global test set (every participating
    # domain, balanced over classes); it never waits for the clients
    t0 = time.perf_counter()
    global_eval = evaluate_global(method, ctx, got, out, {})
    timings["global_evaluate"] = time.perf_counter() - t0
    artifacts.record_global_accuracy(run_dir, global_eval["global_accuracy"])

    # 5. Report before the push: a push that never ends loses no result
    def report(evals: dict[int, dict[str, Any]], final: bool) -> dict[str, Any]:
        timings["total"] = time.perf_counter() - t_start
        fleet.update(fleet_summary(journal, got))
        for m in got.missing:
            if m["node_id"] in fleet["late"]:
                m["reason"] = "replied after the window closed (late): not used"
        ge = (
            global_eval
            if out.model_state is not None
            else evaluate_global(method, ctx, got, out, evals)
        )
        return results.report(
            method, ctx, got, out, evals, timings, download, ge, fleet, final=final
        )

    if method.evaluate_type is None:
        return report({}, final=True)
    report({}, final=False)

    # 6. Push the global model to every contributor still connected; take their
    # evaluations as they arrive (up to evaluate-timeout-s)
    t0 = time.perf_counter()
    assert push is not None  # made with the check of the global model
    download["push"] = C.record_nbytes(push)
    evals = push_and_evaluate(
        grid,
        push,
        method.evaluate_type,
        [r.node_id for r in got.replies],
        ctx,
        cfg.evaluate_timeout_s,
        clock,
    )
    take_late(grid, journal, window["outstanding"], clock.time())
    timings["evaluate"] = time.perf_counter() - t0

    # 7. Report: results.json, plots and the per-client table
    return report(evals, final=True)


def global_records(
    out: ServerOutput, push: RecordDict | None
) -> dict[str, dict[str, torch.Tensor]]:
    """The global model as it is evaluated and pushed: the classifier, and every
    ArrayRecord of the push message decoded (a record sent as fp16 is read back
    as fp16, so what it cannot hold shows as Inf)."""
    records: dict[str, dict[str, torch.Tensor]] = {}
    if out.model_state is not None:
        records[C.KEY_MODEL] = out.model_state
    if push is not None:
        for name, rec in push.array_records.items():
            records[name] = C.from_array_record(rec)
    return records


def push_and_evaluate(
    grid: Grid,
    content: Any,
    message_type: str,
    contributors: list[int],
    ctx: ServerContext,
    timeout_s: float,
    clock: Clock,
) -> dict[int, dict[str, Any]]:
    """Push to the contributors that are connected; pull their evaluations as
    they arrive, until all answered or ``timeout_s`` passed."""
    connected = set(int(n) for n in grid.get_node_ids())
    nodes = [n for n in contributors if n in connected]
    gone = len(contributors) - len(nodes)
    log(
        INFO,
        "Pushing the global model to %d contributors (%d no longer connected)",
        len(nodes),
        gone,
    )
    msgs = [Message(content, dst_node_id=n, message_type=message_type) for n in nodes]
    outstanding = {
        str(mid): n
        for n, mid in zip(nodes, grid.push_messages(msgs), strict=True)
        if mid is not None
    }
    evals: dict[int, dict[str, Any]] = {}
    end = clock.time() + timeout_s
    while outstanding and clock.time() < end:
        for msg in grid.pull_messages(list(outstanding)):
            node = outstanding.pop(str(msg.metadata.reply_to_message_id), None)
            if node is None:
                continue
            if msg.has_error():
                log(
                    WARNING,
                    "Evaluation failed on node %s: %s",
                    node,
                    C.safe_text(msg.error.reason, 300),
                )
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
        if outstanding:
            clock.sleep(POLL_S)
    if outstanding:
        log(
            WARNING,
            "%d contributors did not return an evaluation within evaluate-timeout-s",
            len(outstanding),
        )
    return evals


def fleet_summary(journal: persist.Journal, got: Collected) -> dict[str, Any]:
    """results.json's ``fleet``: which nodes were asked, and what became of them."""
    asked = sorted({int(e["node_id"]) for e in journal.of("asked")})
    late = {int(e["node_id"]) for e in journal.of("late")}
    closed = journal.of("closed")
    return {
        "asked": asked,
        "valid": sorted(r.node_id for r in got.replies),
        "rejected": sorted({int(e["node_id"]) for e in got.rejected}),
        # a late node was missing at the close; it is listed once, as late
        "missing": sorted({int(e["node_id"]) for e in got.missing} - late),
        "late": sorted(late),
        "lost_contact": sorted({int(e["node_id"]) for e in journal.of("lost")}),
        "times_asked": len(journal.of("asked")),
        "closed_reason": closed[0].get("reason") if closed else None,
        "window_s": (
            round(float(closed[0]["at"]) - float(journal.opened["window_start"]), 3)
            if closed and journal.opened
            else None
        ),
    }
