"""What the committed benches measured of each method's client: its mean upload
and median client time, for README's method table (``methods/docs.py``).

Read from the committed bench results (JSON, no torch, no Flower); a method with
no run there has no cost, and the table says it was not benched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The committed bench results the method table quotes its measured costs from.
# accuracy.json: one record per (method, seed) under "runs", with the client's
# upload and its seconds per training image; lora.json: the LoRA bench's records
# (one client fine-tune each, the same upload for every merge variant).
ACCURACY_RESULTS = "bench-results/accuracy.json"
LORA_RESULTS = "bench-results/lora.json"
LORA_METHOD = "lora"


@dataclass(frozen=True)
class Cost:
    """A method's measured client cost over the bench's runs: the mean upload
    per client and the median client seconds per training image (or per
    fine-tune); the median, because a run that shared the CPU is slow, not
    cheap or dear."""

    upload_bytes: float
    client_s: float | None
    per: str  # "image" or "fine-tune"
    runs: int


def _finite(xs: list[Any]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def _mean(xs: list[Any]) -> float | None:
    v = _finite(xs)
    return sum(v) / len(v) if v else None


def _median(xs: list[Any]) -> float | None:
    v = sorted(_finite(xs))
    if not v:
        return None
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def measured_costs(root: Path) -> dict[str, Cost]:
    """Per method, its mean upload and median client time over the committed
    bench results under the repository ``root`` (a method with no run there is
    absent)."""
    out: dict[str, Cost] = {}
    acc = root / ACCURACY_RESULTS
    if acc.is_file():
        by_method: dict[str, list[dict[str, Any]]] = {}
        for r in json.loads(acc.read_text()).get("runs", []):
            if r.get("ok", True) and r.get("upload_bytes_per_client") is not None:
                by_method.setdefault(r["method"], []).append(r)
        for name, runs in by_method.items():
            up = _mean([r["upload_bytes_per_client"] for r in runs])
            if up is not None:
                s = _median([r.get("client_s_per_image") for r in runs])
                out[name] = Cost(up, s, "image", len(runs))
    lora = root / LORA_RESULTS
    if lora.is_file():
        recs = json.loads(lora.read_text()).get("records", [])
        per_seed = {r["seed"]: r for r in recs if r.get("upload_bytes_per_client")}
        up = _mean([r["upload_bytes_per_client"] for r in per_seed.values()])
        if up is not None:
            s = _median([r.get("client_train_s") for r in per_seed.values()])
            out[LORA_METHOD] = Cost(up, s, "fine-tune", len(per_seed))
    return out


def human_bytes(n: float) -> str:
    """``1234`` -> ``"1.2 KB"`` (powers of 1000, as upload budgets are quoted)."""
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def cost_cells(cost: Cost | None) -> tuple[str, str]:
    """The table's two cells of a cost: upload per client, client time."""
    if cost is None:
        return "not benched", "not benched"
    if cost.client_s is None:
        client = "none (no client training)"
    elif cost.per == "image":
        client = f"{cost.client_s * 1e3:.1f} ms per image"
    else:
        client = f"{cost.client_s:.0f} s per {cost.per}"
    return human_bytes(cost.upload_bytes), client
