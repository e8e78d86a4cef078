"""ServerApp: validates the config once, then runs the one-shot round."""

from __future__ import annotations

import os
from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError
from methods import build_config

from .round import run_one_shot

# Ray (Flower's simulation engine) prints a FutureWarning tip at start; keep the
# round's log for the round. Opting in is harmless: no actor here asks for GPUs.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = build_config(context.run_config)
    except ConfigError as e:
        # Stop before any client does any work.
        log(ERROR, "%s", e)
        raise
    run_one_shot(grid, cfg, context.run_id)
