"""The LoRA bench's worlds, variants and settings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench import report

MERGES = ("fedavg", "stack", "svd", "ties", "dare", "generative")

VARIANTS = ("none", *MERGES, "own")

# The merges the issue expects to beat fedavg (FedIT) on both metrics.
CHALLENGERS = ("stack", "svd", "generative")

# Client domains of each world: client i holds domain i.
WORLDS: dict[str, str] = {
    "shared": "inverted+upside-down,thick+upside-down,rotated+upside-down,noisy+upside-down",
    "disjoint": "inverted+mirrored,thick+upside-down,thin+boxed,rotated+small",
}

# Both worlds and modes.
WORLD: dict[str, Any] = {
    "method": "lora",
    "partition": "dirichlet",
    "dirichlet-alpha": 0.5,
}

# --quick: fewer steps and samples so that 3 seeds x 8 variants fit in 20 minutes
# on the 2-core CPU. Client training costs steps x batch, not dataset size, so
# clients keep 800 examples (160 held out: a steadier accuracy).
QUICK: dict[str, Any] = {
    "max-examples-per-client": 800,
    "lora-steps": 150,
    "lora-samples-per-class": 16,
    "images-per-class": 12,
    "num-inference-steps": 10,
    "train-epochs": 10,
    "train-batch-size": 32,
}

FULL: dict[str, Any] = {
    "max-examples-per-client": 1500,
    "lora-steps": 400,
    "images-per-class": 24,
    "train-batch-size": 64,
}


def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each in ``allowed``.

    Raises
    ------
    ValueError
        If an item is not allowed or the list is empty; names the option ``--what``.
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(
            f"--{what} {text!r}: unknown {bad}; choose from {', '.join(allowed)}"
        )
    return items


def say(msg: str) -> None:
    """One progress line of the LoRA bench."""
    report.say(msg, "bench lora")
