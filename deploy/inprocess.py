"""The round in one process: a Grid that hands messages to the real ClientApp.

One harness for the tests, the benchmarks and the fleet bench. ``InProcessGrid``
implements Flower's ``Grid`` (``get_node_ids``, ``push_messages``,
``pull_messages``, ``send_and_receive``) over a list of ``Device``s, each with
the node config a SuperNode would have, the moment it connects, how long its
reply takes, whether it ever replies, when it leaves, and an optional hook that
tampers with its upload. Time is a ``VirtualClock``: the round's polling and
waiting cost nothing, so a 30-minute collection window of a thousand devices
runs as fast as the clients' work.

The ClientApp runs when a message is pushed (its work happens "on the device");
the reply becomes visible to ``pull_messages`` ``reply_s`` later, once, as the
SuperLink hands each reply out once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

FIRST_NODE_ID = 101
Tamper = Callable[[Message, Message], Message | None]  # (reply, request) -> reply


class VirtualClock:
    """Wall-clock seconds that move only when the round sleeps."""

    def __init__(self, start: float = 1.0e9) -> None:
        self.now = float(start)

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, float(seconds))


@dataclass
class Device:
    """One SuperNode of the in-process fleet (times relative to the clock's start)."""

    node_id: int
    node_config: dict[str, Any]
    arrive_s: float = 0.0  # connects this long after the start
    reply_s: float = 0.0  # its upload reaches the SuperLink this long after it is asked
    evaluate_s: float = 0.0  # the same for its evaluation of the pushed model
    silent: bool = False  # never replies (crashed, out of battery)
    leave_s: float | None = None  # disconnects this long after the start
    tamper: Tamper | None = None  # rewrites its upload (None from it: no reply)
    public_key: bytes | None = None  # its registered key (PEM), listed by get_nodes


@dataclass
class _Pending:
    ready_at: float
    reply: Message


def partition_fleet(
    num_nodes: int, tamper: dict[int, Tamper] | None = None
) -> list[Device]:
    """``num_nodes`` devices holding the partitions of a benchmark split, all
    connected from the start and replying at once."""
    tamper = tamper or {}
    return [
        Device(
            FIRST_NODE_ID + p,
            {"partition-id": p, "num-partitions": num_nodes},
            tamper=tamper.get(p),
        )
        for p in range(num_nodes)
    ]


class InProcessGrid(Grid):
    """Flower's Grid over in-process devices that run the real ClientApp.

    ``client_app``: the ClientApp, or any ``(Message, Context) -> Message`` (a
    benchmark may replay recorded replies). ``sent`` lists ``(node, message
    type)`` of every pushed message, in order.
    """

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        devices: list[Device],
        run_config: dict[str, Any],
        clock: VirtualClock | None = None,
    ) -> None:
        self.client_app = client_app
        self.devices = {d.node_id: d for d in devices}
        self.run_config = run_config
        self.clock = clock or VirtualClock()
        self.start = self.clock.time()
        self.sent: list[tuple[int, str]] = []
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()
        # Flower keeps one Context.state per node for the whole run
        self.states: dict[int, RecordDict] = {n: RecordDict() for n in self.devices}
        # Message() reads the identity a real SuperLink sets for the ServerApp.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0

    @property
    def nodes(self) -> list[int]:
        return list(self.devices)

    def _connected(self, d: Device) -> bool:
        t = self.clock.time() - self.start
        return d.arrive_s <= t and (d.leave_s is None or t < d.leave_s)

    # Grid's API ------------------------------------------------------------
    def set_run(self, run: Any) -> None:  # pragma: no cover - unused
        pass

    @property
    def run(self) -> Any:  # pragma: no cover - unused
        return None

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n, d in self.devices.items() if self._connected(d)]

    def get_nodes(self) -> list[Any]:
        """Flower's ``NodeInfo`` of the connected devices (with their keys)."""
        from flwr.proto.node_pb2 import NodeInfo

        return [
            NodeInfo(node_id=n, public_key=d.public_key or b"")
            for n, d in self.devices.items()
            if self._connected(d)
        ]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            reply = self._deliver(msg)
            if reply is not None:
                d = self.devices[msg.metadata.dst_node_id]
                delay = d.evaluate_s if _is_evaluation(msg) else d.reply_s
                self._pending[mid] = _Pending(self.clock.time() + delay, reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = self.clock.time()
        out = []
        for mid in message_ids:
            p = self._pending.get(mid)
            if p is not None and p.ready_at <= now:
                out.append(self._pending.pop(mid).reply)
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then wait (on the clock) for the replies or the timeout."""
        ids = list(self.push_messages(messages))
        end = self.clock.time() + (timeout if timeout is not None else 0.0)
        got: list[Message] = []
        while True:
            got += self.pull_messages(ids)
            ids = [i for i in ids if i in self._pending]
            if not ids or self.clock.time() >= end:
                return got
            self.clock.sleep(1.0)

    # the device side ----------------------------------------------------------
    def _deliver(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        self.sent.append((node, msg.metadata.message_type))
        d = self.devices.get(node)
        if d is None or d.silent or not self._connected(d):
            return None
        ctx = Context(
            run_id=1,
            node_id=node,
            node_config=dict(d.node_config),
            state=self.states[node],
            run_config=dict(self.run_config),
        )
        try:
            reply = self.client_app(msg, ctx)
        except Exception as e:  # as a SuperNode reports a ClientApp exception
            reply = Message(
                Error(
                    ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    f"{e.__class__.__name__}: {e}",
                ),
                reply_to=msg,
            )
        # Uploads are tampered with; evaluation replies go through untouched.
        if d.tamper is not None and not _is_evaluation(msg):
            tampered = d.tamper(reply, msg)
            if tampered is None:  # the node never answers
                return None
            reply = tampered
        reply.metadata.__dict__["_src_node_id"] = node  # the SuperLink sets it
        return reply


def _is_evaluation(msg: Message) -> bool:
    return msg.metadata.message_type.startswith("evaluate")


def run_round(
    devices: list[Device],
    run_config: dict[str, Any],
    run_id: int | str = "inprocess",
    clock: VirtualClock | None = None,
    client_app: Callable[[Message, Context], Message] | None = None,
) -> tuple[dict[str, Any], InProcessGrid]:
    """The real one-shot round over in-process devices: ``(results, grid)``."""
    from methods import build_config
    from server_app.round import run_one_shot

    if client_app is None:
        from client_app.app import app

        client_app = app
    grid = InProcessGrid(client_app, devices, run_config, clock)
    res = run_one_shot(grid, build_config(run_config), run_id, clock=grid.clock)
    return res, grid


__all__ = [
    "Device",
    "InProcessGrid",
    "VirtualClock",
    "partition_fleet",
    "run_round",
]
