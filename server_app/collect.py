"""The collection window: every device that connects while it is open is asked
once, and every reply is screened and persisted the moment it arrives.

A fleet is not a LAN at t=0: devices connect when they have power and a link,
upload once and vanish. The window (``collect-window-s``) polls the SuperLink for
nodes, pushes the collect message to each new node when it appears
(``Grid.push_messages``) and pulls replies as they arrive
(``Grid.pull_messages``); each reply's envelope is checked and the upload is
written to the run's journal (``persist.Journal``) before the next is pulled.
The window closes at its end, early once ``target-clients`` valid uploads are in,
or (``collect-quiet-s``) once every asked node has answered and no new node has
connected for that long (in Flower's simulation, whose nodes are all there from
the start, for at most a second: ``quiet_for``). ``min-clients`` decides only
whether the round goes on.

Killed at any moment and run again with the same ``run-name``, the window goes on
from its journal: uploads are kept, nodes heard from are not asked again, nodes
asked but not heard from are asked again, and the window keeps its start time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Protocol

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import contract as C
from common.contract import PayloadError, Reply

from .persist import Journal

# A node that went away: its reply can never come; it is asked again if it returns.
LOST_CONTACT = (
    ErrorCode.NODE_UNAVAILABLE,
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
)
MAX_ASKS = 3  # a node that lost contact this often is not asked again
POLL_S = 1.0  # between two looks at the SuperLink
# Flower's simulation registers all its SuperNodes as the run starts
# (flwr.simulation.run_simulation: vce.start_vce beside the ServerApp's thread) and
# none joins later: waiting collect-quiet-s for a new one is idle time. Its quiet
# is at most this: one poll, for the nodes registered while the window opened.
SIMULATION_QUIET_S = POLL_S
PROGRESS_S = 10.0  # between two progress lines


class Clock(Protocol):
    """Wall-clock time and sleeping; the in-process harness passes a virtual one."""

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class Collected:
    """What the round holds of its clients: the replies that passed screening,
    the rejected ones and the missing ones (each with a reason)."""

    replies: list[Reply] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, node: int, reason: str, partition_id: Any = None) -> None:
        """Record node ``node``'s reply as rejected for ``reason`` (logged)."""
        entry: dict[str, Any] = {"node_id": int(node), "reason": reason}
        if isinstance(partition_id, int) and not isinstance(partition_id, bool):
            entry["partition_id"] = partition_id
        self.rejected.append(entry)
        log(WARNING, "Rejected node %s (partition %s): %s", node, partition_id, reason)


@dataclass
class WindowState:
    """What the window knows of the fleet; rebuilt from the journal on resume."""

    asked: dict[int, int] = field(default_factory=dict)  # node -> times asked
    heard: set[int] = field(default_factory=set)  # replied (upload or rejection)
    outstanding: dict[str, int] = field(default_factory=dict)  # message id -> node
    uploads: int = 0
    valid: int = 0
    rejected: int = 0
    lost: dict[int, int] = field(default_factory=dict)  # node -> lost contact
    last_new_node: float = 0.0

    @classmethod
    def from_journal(cls, journal: Journal) -> WindowState:
        st = cls()
        for e in journal.events:
            node = int(e.get("node_id", -1))
            if e["event"] == "asked":
                st.asked[node] = st.asked.get(node, 0) + 1
            elif e["event"] in ("upload", "rejected"):
                st.heard.add(node)
                st.uploads += e["event"] == "upload"
                st.rejected += e["event"] == "rejected"
            elif e["event"] == "lost":
                st.lost[node] = st.lost.get(node, 0) + 1
        return st

    def status(self, elapsed: float, window: float, nodes: int) -> str:
        return (
            f"collect {elapsed:.0f}/{window:.0f} s: {nodes} nodes connected, "
            f"{len(self.asked)} asked, {len(self.heard)} replied, "
            f"{self.valid} valid, {self.rejected} rejected, "
            f"{len(self.outstanding)} outstanding"
        )


def quiet_for(grid: Grid, quiet_s: float) -> float:
    """``collect-quiet-s`` on this grid: at most ``SIMULATION_QUIET_S`` in
    Flower's simulation (its in-memory grid: a fixed fleet); as set elsewhere,
    and 0 (off) everywhere."""
    # A grid of that class has its module loaded already; anywhere else importing
    # it would cost half a second of Flower's SuperLink code for nothing.
    module = sys.modules.get("flwr.superlink.grid.inmemory_grid")
    if quiet_s > 0 and module is not None and isinstance(grid, module.InMemoryGrid):
        return min(quiet_s, SIMULATION_QUIET_S)
    return quiet_s


def run_window(
    grid: Grid,
    journal: Journal,
    *,
    content: RecordDict,
    message_type: str,
    payload_key: str | None,
    max_upload_bytes: int,
    window_s: float,
    target_clients: int,
    quiet_s: float,
    precheck: Callable[[Reply], str | None],
    clock: Clock,
) -> dict[str, Any]:
    """Run (or go on with) the collection window; every event goes to ``journal``.

    ``precheck(reply)`` returns ``None`` for an upload that counts toward
    ``target-clients``, or the reason it would be rejected (the final screening
    happens after the close, over every persisted upload). Returns the window's
    summary: when and why it closed, and the message ids still outstanding (their
    replies, if any arrive later, are recorded as late).
    """
    # 1. Open the window, or go on with the one in the journal
    journal.open(clock.time())
    opened = journal.opened
    assert opened is not None
    start = float(opened["window_start"])
    end = start + window_s
    st = WindowState.from_journal(journal)
    if st.uploads:  # what counts toward target-clients, as on arrival
        st.valid = sum(precheck(r) is None for r in journal.replies())
    if st.asked:
        log(
            INFO,
            "Resuming the collection window (opened %.0f s ago): %d uploads "
            "kept, %d nodes heard from are not asked again",
            clock.time() - start,
            st.uploads,
            len(st.heard),
        )
    st.last_new_node = clock.time()
    last_progress = -PROGRESS_S
    reason = "window"
    while True:
        now = clock.time()
        if now >= end:
            reason = "window"
            break
        # 2. Ask every node that appeared and was not heard from (once per visit)
        nodes = set(int(n) for n in grid.get_node_ids())
        pending = set(st.outstanding.values())
        new = sorted(
            n
            for n in nodes
            if n not in st.heard and n not in pending and st.lost.get(n, 0) < MAX_ASKS
        )
        if new:
            msgs = [
                Message(content, dst_node_id=n, message_type=message_type) for n in new
            ]
            ids = list(grid.push_messages(msgs))
            for n, mid in zip(new, ids, strict=True):
                if mid is None:  # Flower could not push it (malformed)
                    log(WARNING, "Could not push the collect message to node %s", n)
                    continue
                st.outstanding[str(mid)] = n
                st.asked[n] = st.asked.get(n, 0) + 1
                journal.append("asked", node_id=n, at=now)
            st.last_new_node = now
        # 3. Take the replies that arrived; screen and persist each one
        if st.outstanding:
            for msg in grid.pull_messages(list(st.outstanding)):
                take_reply(
                    msg, st, journal, payload_key, max_upload_bytes, precheck, now
                )
        # 4. Close early: enough valid uploads, or a quiet fleet
        if target_clients and st.valid >= target_clients:
            reason = "target-clients"
            break
        if (
            quiet_s
            and st.asked
            and not st.outstanding
            and now - st.last_new_node >= quiet_s
        ):
            reason = "quiet"
            break
        if now - last_progress >= PROGRESS_S:
            log(INFO, "%s", st.status(now - start, window_s, len(nodes)))
            last_progress = now
        clock.sleep(POLL_S)
    now = clock.time()
    log(INFO, "%s", st.status(now - start, window_s, len(st.asked)))
    # 5. Close: every node asked and not heard from is missing (a reply that
    # comes later is late, not used)
    waiting = set(st.outstanding.values())
    for node in sorted(set(st.asked) - st.heard):
        if node in waiting:
            why = f"no reply before the window closed ({reason})"
        elif node in st.lost:
            why = f"lost contact {st.lost[node]} time(s), not heard from"
        else:  # asked by a server that died; not seen again before the close
            why = "asked before the server restarted; not heard from"
        journal.append("missing", node_id=node, at=now, reason=why)
    journal.append("closed", reason=reason, at=now, outstanding=st.outstanding)
    log(INFO, "Collection window closed (%s) after %.0f s", reason, now - start)
    return {
        "reason": reason,
        "outstanding": dict(st.outstanding),
        "seconds": now - start,
    }


def take_reply(
    msg: Message,
    st: WindowState,
    journal: Journal,
    payload_key: str | None,
    max_upload_bytes: int,
    precheck: Callable[[Reply], str | None],
    now: float,
) -> None:
    """One reply: a lost node (asked again if it returns), a rejection, or an
    upload persisted before anything else happens."""
    node = st.outstanding.pop(str(msg.metadata.reply_to_message_id), None)
    if node is None:
        return  # not ours (already taken)
    if msg.has_error() and msg.error.code in LOST_CONTACT:
        st.lost[node] = st.lost.get(node, 0) + 1
        journal.append(
            "lost", node_id=node, at=now, reason=C.safe_text(msg.error.reason, 200)
        )
        return
    st.heard.add(node)
    try:
        r = check_envelope(msg, node, payload_key, max_upload_bytes)
    except PayloadError as e:
        st.rejected += 1
        journal.append(
            "rejected", node_id=node, reason=str(e), at=now, **claimed_partition(msg)
        )
        return
    journal.upload(r, at=now)
    st.uploads += 1
    if precheck(r) is None:
        st.valid += 1


def check_envelope(
    msg: Message, node: int, payload_key: str | None, max_upload_bytes: int
) -> Reply:
    """The reply of ``node`` as a ``Reply``, or ``PayloadError`` with the reason
    (a client error, a reply from another node, a malformed envelope)."""
    if msg.has_error():
        raise PayloadError(
            f"client error {msg.error.code}: {C.safe_text(msg.error.reason, 300)}"
        )
    src = int(msg.metadata.src_node_id) if msg.metadata.src_node_id else node
    if src != node:  # the SuperLink routes replies; a mismatch is not ours to trust
        raise PayloadError(f"reply came from node {src}, asked node {node}")
    return C.unpack_reply(node, msg.content, payload_key, max_upload_bytes)


def claimed_partition(msg: Message) -> dict[str, Any]:
    try:
        pid = msg.content.config_records[C.KEY_META].get("partition-id")
    except Exception:
        return {}
    return {"partition_id": pid} if isinstance(pid, int) else {}


def take_late(
    grid: Grid, journal: Journal, outstanding: dict[str, int], now: float
) -> list[dict[str, Any]]:
    """Replies to the collect message that arrived after the close: recorded as
    late (node, bytes), not used. Drops them from ``outstanding``."""
    if not outstanding:
        return []
    late = []
    for msg in grid.pull_messages(list(outstanding)):
        node = outstanding.pop(str(msg.metadata.reply_to_message_id), None)
        if node is None:
            continue
        nbytes = 0 if msg.has_error() else C.record_nbytes(msg.content)
        late.append(journal.append("late", node_id=node, upload_bytes=nbytes, at=now))
        log(
            WARNING,
            "Node %s replied after the window closed: recorded as late, not used",
            node,
        )
    return late
