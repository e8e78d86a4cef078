"""ClientApp: thin handlers — parse, call the method's Flower-free work, pack the reply.

Every message type any registered method uses is registered here in one loop; a
handler finds the method by the run's ``method`` key, so adding a method adds no
handler. What the node uploads is kept in its Flower ``Context.state`` for the
evaluation that follows in the same run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from common import contract as C
from common.config import RunConfig
from common.datasets import ClientData, load_client_data
from common.models import ARCHS
from methods import METHODS, build_config
from methods.base import ClientJob, OneShotMethod

app = ClientApp()

MEMORY = "uploaded"  # Context.state key of the node's own upload


@functools.lru_cache(maxsize=4)
def client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """Partition ``partition_id`` of ``num_partitions`` of the run's dataset
    (cached: a node's collect and evaluate messages share one copy)."""
    a = cfg.data_args()
    return load_client_data(
        a.dataset,
        a.partition,
        partition_id,
        num_partitions,
        image_size=a.image_size,
        alpha=a.alpha,
        classes_per_client=a.classes_per_client,
        domains=a.domains,
        max_examples=a.max_examples,
        test_fraction=a.test_fraction,
        seed=a.seed,
    )


def node_partition(node_config: Any, own_data: bool) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of a benchmark split, or
    ``(NO_PARTITION, 0)`` for a device with its own data (node config
    ``data-path``): a device cannot know the fleet's size, and needs not."""
    if "partition-id" in node_config and "num-partitions" in node_config:
        return int(node_config["partition-id"]), int(node_config["num-partitions"])
    if own_data:
        return C.NO_PARTITION, 0
    raise ValueError(
        "node config has neither data-path (the device's own data) nor "
        "partition-id and num-partitions (a benchmark split of the run's dataset); "
        "start the SuperNode with --node-config \"data-path='/path/to/images'\""
    )


def _job(msg: Message, context: Context) -> ClientJob:
    """Parse a message and the node's context into the method's ``ClientJob``."""
    cfg = build_config(context.run_config)
    # A real SuperNode may point at its own data (node config data-path).
    data_path = context.node_config.get("data-path")
    if data_path:
        cfg = cfg.model_copy(update={"dataset": str(data_path)})
    # ... and may train its own classifier architecture (model-heterogeneous FL).
    node_classifier = str(context.node_config.get("classifier", "") or "")
    if node_classifier and node_classifier not in ARCHS:
        raise ValueError(
            f"node-config classifier={node_classifier!r} is not one of {', '.join(ARCHS)}"
        )
    pid, n = node_partition(context.node_config, bool(data_path))
    if pid == C.NO_PARTITION:  # the device's own data, all of it
        cfg = cfg.model_copy(update={"partition": "iid"})
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    memory = context.state.array_records.get(MEMORY)
    return ClientJob(
        cfg=cfg,
        partition_id=pid,
        num_partitions=n,
        data=client_data(cfg, max(pid, 0), max(n, 1)),
        node_id=int(context.node_id),
        config=dict(msg.content.config_records.get(C.KEY_CONFIG, {})),
        arrays={
            k: C.from_array_record(rec) for k, rec in msg.content.array_records.items()
        },
        memory=C.from_array_record(memory) if memory is not None else {},
        node_classifier=node_classifier,
    )


def _method(job: ClientJob, message_type: str, role: str) -> type[OneShotMethod]:
    """The run's method, checked to handle ``message_type`` in ``role``."""
    method = METHODS[job.cfg.method]
    expected = method.collect_type if role == "collect" else method.evaluate_type
    if message_type != expected:
        raise ValueError(
            f"message type {message_type!r} is not method={job.cfg.method!r}'s "
            f"{role} message ({expected!r}); server and client configs differ"
        )
    return method


def collect(msg: Message, context: Context) -> Message:
    """The one upload of the round."""
    job = _job(msg, context)
    method = _method(job, msg.metadata.message_type, "collect")
    result = method.client_collect(job)
    arrays = {method.payload_key: result.payload} if method.payload_key else {}
    content = C.pack_reply(
        job.meta() | result.meta, result.metrics, arrays, result.half
    )
    if method.payload_key:
        context.state[MEMORY] = ArrayRecord(
            dict(content.array_records[method.payload_key])
        )
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate what the server pushed back on the held-out split."""
    job = _job(msg, context)
    method = _method(job, msg.metadata.message_type, "evaluate")
    metrics = {"num-examples": float(len(job.data.train_labels))}
    metrics |= method.client_evaluate(job)
    return Message(C.pack_reply(job.meta(), metrics), reply_to=msg)


def _register(
    message_type: str, handler: Callable[[Message, Context], Message]
) -> None:
    """Register ``handler`` for ``message_type`` (``<category>[.<action>]``)."""
    category, _, action = message_type.partition(".")
    decorator = getattr(app, category)  # app.train / app.evaluate / app.query
    (decorator(action) if action else decorator())(handler)


for _type in sorted({m.collect_type for m in METHODS.values()}):
    _register(_type, collect)
for _type in sorted({m.evaluate_type for m in METHODS.values() if m.evaluate_type}):
    _register(_type, evaluate)
