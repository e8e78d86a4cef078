"""The interface of a one-shot method (server side).

A method says which message collects the clients' uploads, how one reply is
validated, what the server does with the accepted ones, and what goes back.
"""

from __future__ import annotations

from flwr.app import RecordDict

from common import contract as C
from common.contract import Reply

from ..context import ServerContext, ServerOutput


class OneShotMethod:
    """Defaults shared by all methods; subclasses override what differs."""

    name: str = ""
    collect_type: str = C.QUERY_INFO
    payload_key: str | None = None
    evaluate_type: str | None = C.EVALUATE  # None: nothing is pushed back

    def check(self, ctx: ServerContext) -> None:
        """Fail fast, before any client work, on a config the method cannot run."""

    def collect_content(self, ctx: ServerContext) -> RecordDict:
        content = RecordDict()
        content[C.KEY_CONFIG] = C.config_record({"method": self.name})
        return content

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        """Raise ``PayloadError`` to reject one client's reply (with the reason)."""

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        return ServerOutput()

    def push_content(self, out: ServerOutput, ctx: ServerContext) -> RecordDict:
        content = RecordDict()
        content[C.KEY_CONFIG] = C.config_record(
            {"method": self.name, "arch": out.arch, "num-classes": ctx.num_classes}
        )
        if out.model_state is not None:
            content[C.KEY_MODEL] = C.to_array_record(out.model_state)
        for key, arrays in out.push_arrays.items():
            content[key] = C.to_array_record(arrays, half=True)
        return content
