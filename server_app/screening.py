"""Step 2 of the round: who the uploads are from, and which ones are used.

The class list the clients agree on, one upload per node and per partition,
a node's identity only through its registered key (``server_app.identity``),
the method's own checks and, with ``screen-outliers``, the cohort's
plausibility screens (``common.robust.screen_uploads``). Every rejection keeps
its reason; nothing here raises on one bad client.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from logging import WARNING
from typing import Any

from flwr.common.logger import log

from common import contract as C
from common.config import RunConfig
from common.contract import PayloadError, Reply
from common.datasets import DatasetInfo
from common.robust import screen_uploads
from methods.base import OneShotMethod, ServerContext

from .collect import Collected
from .identity import DeviceRegistry, RegistryError


class RoundError(RuntimeError):
    """The round cannot go on (too few valid clients, no nodes)."""


def learn_classes(ctx: ServerContext, replies: list[Reply]) -> DatasetInfo:
    """The dataset registry's classes, or the strict majority of the envelopes.

    A dataset that does not name its classes (an image folder) takes the class
    list (and channels) more than half the replies that report one agree on; a
    tie or a split with no majority ends the round (``RoundError``): no rule
    that picks one of them (the first in sorted order, the first to arrive)
    stops one client from imposing its classes on the others.
    """
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
    total = sum(votes.values())
    (names, channels), best = max(votes.items(), key=lambda kv: kv[1])
    if 2 * best <= total:
        split = "; ".join(
            f"{n} of {total} report {C.safe_text(','.join(k[0]), 80)!r} "
            f"({k[1]} channels)"
            for k, n in sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        )
        raise RoundError(
            f"dataset={ctx.cfg.dataset!r} does not name its classes and the clients "
            f"disagree with no majority: {split}; give every client the same class "
            "folders (the same names, the same image mode)"
        )
    return DatasetInfo(ctx.cfg.dataset, names, int(channels))  # type: ignore[arg-type]


def screen(
    method: OneShotMethod,
    ctx: ServerContext,
    got: Collected,
    registry: DeviceRegistry | None = None,
    keys: dict[int, str] | None = None,
) -> Collected:
    """Cross-checks and the method's validation of replies whose envelope is valid.

    Used on fresh replies and again on persisted ones when a run resumes.
    ``registry`` (run-config ``device-registry``): a node's identity is the
    device its key was registered as; an upload claiming another is rejected
    alone. ``keys``: ``{node id: key fingerprint}`` the SuperLink lists now.
    """
    out = Collected(rejected=list(got.rejected), missing=list(got.missing))
    # One upload per node: the first one counts (a node is asked once).
    seen: set[int] = set()
    firsts = []
    for r in got.replies:
        if r.node_id in seen:
            log(
                WARNING,
                "Node %s uploaded twice; only its first upload counts",
                r.node_id,
            )
            continue
        seen.add(r.node_id)
        firsts.append(r)
    # A registered device is who its node's key says: a claim that disagrees is
    # rejected alone, and the device it claimed to be keeps its own upload.
    if registry is not None:
        firsts = [r for r in firsts if _registered(r, registry, keys or {}, out)]
    # A partition id claimed by two nodes: neither can be trusted with it (with
    # a registry no two accepted claims can collide: partitions are registered once).
    claims: dict[int, list[int]] = defaultdict(list)
    for r in firsts:
        if r.partition_id != C.NO_PARTITION:
            claims[r.partition_id].append(r.node_id)
    candidates = []
    for r in firsts:
        if len(claims[r.partition_id]) > 1:
            out.reject(
                r.node_id,
                f"partition-id {r.partition_id} is claimed by nodes "
                f"{sorted(claims[r.partition_id])}; all claims rejected",
                r.partition_id,
            )
        else:
            candidates.append(r)
    ctx.info = learn_classes(ctx, candidates)
    for r in candidates:
        try:
            check_classes(r, ctx.info)
            method.validate(r, ctx)
        except PayloadError as e:
            out.reject(r.node_id, str(e), r.partition_id)
            continue
        except Exception as e:  # a validator bug must not end the round either
            out.reject(
                r.node_id,
                f"validation failed: {e.__class__.__name__}: {C.safe_text(e)}",
                r.partition_id,
            )
            continue
        out.replies.append(r)
    if ctx.cfg.screen_outliers:
        reject_outliers(out)
    assign_client_ids(out.replies)
    out.replies.sort(key=lambda r: r.partition_id)
    return out


def reject_outliers(got: Collected) -> None:
    """``screen-outliers``: reject the valid uploads implausible next to the rest
    of the cohort (``common.robust.screen_uploads``: weight norms against the
    median, class vectors against their class's robust centre), each with its
    reason. Method-agnostic: the payload convention says which tensors are
    weights and which are class vectors."""
    try:
        reasons = screen_uploads([r.tensors for r in got.replies])
    except Exception as e:  # a screen bug must not let one upload end the round
        log(
            WARNING,
            "screen-outliers failed (%s: %s): no upload screened",
            e.__class__.__name__,
            C.safe_text(e),
        )
        return
    kept = []
    for r, why in zip(got.replies, reasons, strict=True):
        if why is None:
            kept.append(r)
        else:
            got.reject(r.node_id, why, r.partition_id)
    got.replies = kept


def _registered(
    r: Reply, registry: DeviceRegistry, keys: dict[int, str], out: Collected
) -> bool:
    """Whether ``r`` agrees with its node's registered device; rejected if not."""
    try:
        registry.check(r, keys.get(r.node_id))
    except PayloadError as e:
        dev = registry.by_node.get(r.node_id)
        registered = dev.partition_id if dev is not None else None
        out.reject(
            r.node_id, str(e), r.partition_id if registered is None else registered
        )
        return False
    return True


def load_registry(cfg: RunConfig) -> DeviceRegistry | None:
    """The run's device registry (``device-registry``), or None (simulation)."""
    if not cfg.device_registry:
        return None
    try:
        return DeviceRegistry.load(cfg.device_registry)
    except RegistryError as e:
        raise RoundError(str(e)) from None


def assign_client_ids(replies: list[Reply]) -> None:
    """Devices with their own data declare no partition: they get the ids after
    the largest declared one, in node-id order (the same on every resume)."""
    declared = [r.partition_id for r in replies if r.partition_id != C.NO_PARTITION]
    nxt = max(declared, default=-1) + 1
    for r in sorted(replies, key=lambda r: r.node_id):
        if r.partition_id == C.NO_PARTITION:
            r.meta["client-id-assigned"] = True
            r.partition_id = nxt
            nxt += 1


def precheck(
    method: OneShotMethod, ctx: ServerContext, registry: DeviceRegistry | None = None
) -> Any:
    """The checks one upload can get on arrival (toward ``target-clients``): its
    registered identity, the dataset's classes and the method's validation,
    where the classes are known."""

    def check(r: Reply) -> str | None:
        try:
            if registry is not None:
                registry.check(r)
        except PayloadError as e:
            return str(e)
        if ctx.info is None:
            return None  # classes come from the vote at the close
        try:
            check_classes(r, ctx.info)
            method.validate(r, ctx)
        except Exception as e:
            return str(e)
        return None

    return check


def check_classes(r: Reply, info: DatasetInfo) -> None:
    if r.class_names is not None and r.class_names != info.class_names:
        raise PayloadError(
            f"class-names {C.safe_text(','.join(r.class_names))!r} disagree "
            f"with the dataset's {C.safe_text(','.join(info.class_names))!r}"
        )
    if r.channels is not None and r.channels != info.channels:
        raise PayloadError(f"channels={r.channels}, the dataset has {info.channels}")
