"""The tests' in-process Grid: ``deploy.inprocess.InProcessGrid`` over a
benchmark split (``num_nodes`` partitions, all connected from the start), with
per-partition hooks that simulate crashes, silence or malformed replies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deploy.inprocess import InProcessGrid, Tamper, partition_fleet


class FakeGrid(InProcessGrid):
    def __init__(
        self,
        client_app: Callable[..., Any],
        num_nodes: int,
        run_config: dict,
        tamper: dict[int, Tamper] | None = None,
    ) -> None:
        super().__init__(client_app, partition_fleet(num_nodes, tamper), run_config)
