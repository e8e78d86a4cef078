"""An in-process Grid: delivers messages to the ClientApp's handlers directly.

Lets tests drive the real round and the real client handlers without a
SuperLink; per-node hooks simulate crashes, silence or malformed replies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class FakeGrid(Grid):
    def __init__(
        self,
        client_app,
        num_nodes: int,
        run_config: dict,
        tamper: dict[int, Callable[[Message, Message], Message | None]] | None = None,
    ) -> None:
        self.client_app = client_app
        self.nodes = list(range(101, 101 + num_nodes))
        self.run_config = run_config
        self.tamper = tamper or {}
        self.sent: list[tuple[int, str]] = []
        # Flower keeps one Context.state per node for the whole run
        self.states: dict[int, RecordDict] = {n: RecordDict() for n in self.nodes}
        # Message() reads the identity a real SuperLink sets for the ServerApp.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0

    # Grid's abstract API --------------------------------------------------
    def set_run(self, run_id: int) -> None:  # pragma: no cover - unused
        pass

    @property
    def run(self):  # pragma: no cover - unused
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def get_nodes(self):  # pragma: no cover - unused
        return []

    def push_messages(self, messages):  # pragma: no cover - unused
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - unused
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append((node, msg.metadata.message_type))
            pid = self.nodes.index(node)
            ctx = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": pid, "num-partitions": len(self.nodes)},
                state=self.states[node],
                run_config=dict(self.run_config),
            )
            reply = self.client_app(msg, ctx)
            hook = self.tamper.get(pid)
            # Uploads are tampered with; evaluation replies go through untouched.
            if hook is not None and not msg.metadata.message_type.startswith(
                "evaluate"
            ):
                reply = hook(reply, msg)
                if reply is None:  # the node never answers
                    continue
            reply.metadata.__dict__["_src_node_id"] = node  # the SuperLink sets it
            replies.append(reply)
        return replies
