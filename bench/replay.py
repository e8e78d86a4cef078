"""Genuine client replies, recorded once and replayed to many rounds.

``record_replies`` runs the real ClientApp's collect on the partitions of a
benchmark split through ``deploy.inprocess``'s Grid and keeps each reply in
Flower's wire format. ``ReplayClient`` stands in for the ClientApp in later
rounds on the same Grid: it answers the collect message with a recorded reply,
so the clients' work (captioning, encoding, training) is paid once while the
server's settings vary (``bench.inprocess``) or the fleet grows
(``bench.fleet``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from bench.report import write_json

ClientFn = Callable[[Message, Context], Message]


def record_replies(
    run_config: dict[str, Any], pool: int, run_dir: Path = Path(".")
) -> tuple[list[bytes], dict[str, Any]]:
    """The real ClientApp's collect on the partitions of a ``pool``-way split.

    Parameters
    ----------
    run_config
        The run config of the rounds that will replay the replies.
    pool
        Partitions ``0..pool-1`` are asked, one device each, through
        ``deploy.inprocess.InProcessGrid``.
    run_dir
        The server context's run folder (the collect message is built as the
        round builds it; nothing is written).

    Returns
    -------
    tuple
        ``(replies, info)``: each reply's content in Flower's wire format
        (partition ``p`` at index ``p``), and what ``ReplayClient`` needs with
        the clients' seconds and reply sizes.
    """
    from flwr.common.serde import recorddict_to_proto

    from client_app.app import app
    from common.datasets import dataset_info
    from deploy.inprocess import InProcessGrid, partition_fleet
    from methods import build_config, get_method
    from methods.base import ServerContext

    cfg = build_config(run_config)
    method = get_method(cfg.method)
    ctx = ServerContext(cfg=cfg, run_dir=run_dir, info=dataset_info(cfg.data_args()))
    content = method.collect_content(ctx)
    grid = InProcessGrid(app, partition_fleet(pool), dict(run_config))
    replies: list[bytes] = []
    client_s: list[float] = []
    for p, node in enumerate(grid.nodes):
        t0 = time.perf_counter()
        msg = Message(content, dst_node_id=node, message_type=method.collect_type)
        (reply,) = grid.pull_messages(grid.push_messages([msg]))
        client_s.append(round(time.perf_counter() - t0, 3))
        if reply.has_error():
            raise RuntimeError(f"partition {p}: the ClientApp failed: {reply.error}")
        replies.append(recorddict_to_proto(reply.content).SerializeToString())
    info = {
        "pool": pool,
        "method": cfg.method,
        "collect_type": method.collect_type,
        "evaluate_type": method.evaluate_type,
        "payload_key": method.payload_key,
        "client_s": client_s,
        "reply_bytes": [len(r) for r in replies],
    }
    return replies, info


def record_pool(
    run_config: dict[str, Any], pool: int, pool_dir: Path
) -> dict[str, Any]:
    """``record_replies`` saved to ``pool_dir``: ``partition-<p>.pb`` (Flower's
    wire format) and ``pool.json`` (the info, returned)."""
    pool_dir.mkdir(parents=True, exist_ok=True)
    replies, info = record_replies(run_config, pool, pool_dir)
    for p, data in enumerate(replies):
        (pool_dir / f"partition-{p}.pb").write_bytes(data)
    write_json(pool_dir / "pool.json", info)
    return info


class ReplayClient:
    """A ClientApp stand-in that answers with recorded genuine replies.

    The device on partition ``p`` of an ``n``-way fleet answers the collect
    message with the recorded reply of partition ``p mod P`` (a fresh copy), its
    ``partition-id`` and ``num-partitions`` set to ``p`` and ``n``, as a reply
    to the message (``reply_to``).

    The evaluation of the pushed model depends on the model, so it is never
    replayed: with ``evaluate`` (the real ClientApp) the device evaluates it
    for real, the recorded upload kept in its ``Context.state`` as the real
    collect keeps it; without, it answers with its envelope and
    ``num-examples`` only.
    """

    def __init__(
        self,
        pool: Sequence[bytes],
        collect_type: str,
        evaluate_type: str | None,
        evaluate: ClientFn | None = None,
        payload_key: str | None = None,
    ) -> None:
        if not pool:
            raise ValueError("an empty pool: record at least one reply")
        self.pool = list(pool)
        self.collect_type = collect_type
        self.evaluate_type = evaluate_type
        self.evaluate = evaluate
        self.payload_key = payload_key

    @classmethod
    def of(
        cls,
        replies: Sequence[bytes],
        info: dict[str, Any],
        evaluate: ClientFn | None = None,
    ) -> ReplayClient:
        """The client of ``record_replies``' output."""
        return cls(
            replies,
            info["collect_type"],
            info["evaluate_type"],
            evaluate,
            info.get("payload_key"),
        )

    @classmethod
    def load(cls, pool_dir: Path, evaluate: ClientFn | None = None) -> ReplayClient:
        """The client of a pool saved by ``record_pool``."""
        info = json.loads((pool_dir / "pool.json").read_text())
        pool = [
            (pool_dir / f"partition-{p}.pb").read_bytes() for p in range(info["pool"])
        ]
        return cls.of(pool, info, evaluate)

    def reply_content(self, partition_id: int, num_partitions: int) -> Any:
        """The recorded reply of ``partition_id mod P``, as that device's."""
        from flwr.common.serde import ProtoRecordDict, recorddict_from_proto

        from common import contract as C

        raw = self.pool[partition_id % len(self.pool)]
        content = recorddict_from_proto(ProtoRecordDict.FromString(raw))
        meta = content.config_records[C.KEY_META]
        meta["partition-id"] = partition_id
        meta["num-partitions"] = num_partitions
        return content

    def __call__(self, msg: Message, context: Context) -> Message:
        from common import contract as C

        pid = int(context.node_config["partition-id"])
        n = int(context.node_config["num-partitions"])
        kind = msg.metadata.message_type
        if kind == self.collect_type:
            content = self.reply_content(pid, n)
            if self.evaluate is not None and self.payload_key in content.array_records:
                from flwr.app import ArrayRecord

                from client_app.app import MEMORY

                # what the real collect keeps for the evaluation that follows
                record = content.array_records[self.payload_key]
                context.state[MEMORY] = ArrayRecord(dict(record))
            return Message(content, reply_to=msg)
        if kind == self.evaluate_type:
            if self.evaluate is not None:
                return self.evaluate(msg, context)
            content = self.reply_content(pid, n)
            meta = dict(content.config_records[C.KEY_META])
            meta.pop("schema", None)
            metrics = content.metric_records[C.KEY_METRICS]
            return Message(
                C.pack_reply(meta, {"num-examples": metrics["num-examples"]}),
                reply_to=msg,
            )
        raise ValueError(
            f"message type {kind!r} is neither the pool's collect "
            f"({self.collect_type!r}) nor its evaluate ({self.evaluate_type!r})"
        )
