"""The message contract between ServerApp and ClientApps — the one module that
converts tensors to and from Flower records, used by both sides.

Message types (ClientApp action <-> ``message_type``)::

    query.info     server asks for metadata only (class names); class-names method
    train.embed    OSCAR: per-class conditioning vectors up
    train          one-shot FedAvg: locally trained classifier weights up
    train.local    no federation: train and evaluate locally, metrics up
    train.lora     federated LoRA: one adapter of the generator's UNet up
    evaluate       global classifier down, accuracy up
    evaluate.lora  merged adapter (+ global classifier) down, FID-proxy + accuracy up

Every reply carries a ``meta`` ConfigRecord and a ``metrics`` MetricRecord; the
payload records are listed per type below. Replies are validated on the server
(``validate_*``) and a bad one is rejected for that client with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# ---------------------------------------------------------------- names

QUERY_INFO = "query.info"
TRAIN_EMBED = "train.embed"
TRAIN_MODEL = "train"
TRAIN_LOCAL = "train.local"
TRAIN_LORA = "train.lora"
EVALUATE = "evaluate"
EVALUATE_LORA = "evaluate.lora"

KEY_CONFIG = "config"  # server -> client: ConfigRecord with round instructions
KEY_META = "meta"  # client -> server: ConfigRecord
KEY_METRICS = "metrics"  # client -> server: MetricRecord
KEY_EMBEDDINGS = "embeddings"  # ArrayRecord: mean [K, L, D] fp16, class_ids, counts
KEY_MODEL = "model"  # ArrayRecord: a classifier state dict
KEY_LORA = "lora"  # ArrayRecord: LoRA adapter state dict (fp16)

SCHEMA_VERSION = 1


class PayloadError(ValueError):
    """A client's reply is malformed; the message is the recorded reason."""


# ---------------------------------------------------------------- tensors <-> records


def to_array_record(
    tensors: dict[str, torch.Tensor], half: bool = False
) -> ArrayRecord:
    """Tensors -> ArrayRecord. bf16 cannot travel in an ArrayRecord: it goes as fp16."""
    out: dict[str, Array] = {}
    for k, t in tensors.items():
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16 or (half and t.is_floating_point()):
            t = t.to(torch.float16)
        out[k] = Array(
            t.contiguous().numpy()
        )  # keeps 0-d shapes (np.ascontiguousarray would not)
    return ArrayRecord(out)


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()
    }


def record_nbytes(content: RecordDict) -> int:
    """Bytes of tensor data in a message (what the upload budget counts)."""
    return sum(
        len(a.data) for rec in content.array_records.values() for a in rec.values()
    )


# ---------------------------------------------------------------- payloads


@dataclass
class Reply:
    """What the server keeps of one client's reply after validation."""

    node_id: int
    partition_id: int
    num_examples: int
    upload_bytes: int
    meta: dict[str, Any]
    metrics: dict[str, float]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def pack_reply(
    meta: dict[str, Any],
    metrics: dict[str, float],
    arrays: dict[str, dict[str, torch.Tensor]] | None = None,
    half: bool = False,
) -> RecordDict:
    content = RecordDict()
    content[KEY_META] = ConfigRecord({**meta, "schema": SCHEMA_VERSION})
    content[KEY_METRICS] = MetricRecord(dict(metrics))  # type: ignore[arg-type]
    for key, tensors in (arrays or {}).items():
        content[key] = to_array_record(tensors, half=half)
    return content


def unpack_reply(node_id: int, content: RecordDict, payload_key: str | None) -> Reply:
    """Common checks of every reply; raises ``PayloadError`` with the reason."""
    if KEY_META not in content.config_records:
        raise PayloadError(f"reply has no '{KEY_META}' ConfigRecord")
    if KEY_METRICS not in content.metric_records:
        raise PayloadError(f"reply has no '{KEY_METRICS}' MetricRecord")
    meta = dict(content.config_records[KEY_META])
    metrics = {k: float(v) for k, v in content.metric_records[KEY_METRICS].items()}  # type: ignore[arg-type]
    if meta.get("schema") != SCHEMA_VERSION:
        raise PayloadError(f"schema={meta.get('schema')!r}, expected {SCHEMA_VERSION}")
    for k, v in metrics.items():
        if not math.isfinite(v):
            raise PayloadError(f"metric {k!r} is {v}")
    try:
        partition_id = int(meta["partition-id"])  # type: ignore[arg-type]
        num_examples = int(metrics["num-examples"])
    except (KeyError, TypeError, ValueError) as e:
        raise PayloadError(f"missing or bad field {e}") from None
    tensors: dict[str, torch.Tensor] = {}
    if payload_key is not None:
        if payload_key not in content.array_records:
            raise PayloadError(f"reply has no '{payload_key}' ArrayRecord")
        try:
            tensors = from_array_record(content.array_records[payload_key])
        except (
            Exception
        ) as e:  # a corrupt array is one client's problem, not the round's
            raise PayloadError(f"cannot decode '{payload_key}': {e}") from None
    return Reply(
        node_id=node_id,
        partition_id=partition_id,
        num_examples=num_examples,
        upload_bytes=record_nbytes(content),
        meta=meta,
        metrics=metrics,
        tensors=tensors,
    )


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PayloadError(f"tensor {k!r} contains NaN or Inf")


def validate_embeddings(
    reply: Reply, *, num_classes: int, tokens: int, dim: int, max_bytes: int
) -> None:
    """OSCAR payload: ``mean [K, tokens, dim]`` float16, ``class_ids [K]``, ``counts [K]``."""
    t = reply.tensors
    if reply.upload_bytes > max_bytes:
        raise PayloadError(
            f"upload of {reply.upload_bytes} bytes exceeds max-upload-mb"
        )
    for k in ("mean", "class_ids", "counts"):
        if k not in t:
            raise PayloadError(f"embeddings payload lacks {k!r}")
    mean, ids, counts = t["mean"], t["class_ids"], t["counts"]
    if mean.dtype not in (torch.float16, torch.float32):
        raise PayloadError(f"mean has dtype {mean.dtype}, expected float16")
    if mean.ndim != 3 or mean.shape[1:] != (tokens, dim):
        raise PayloadError(
            f"embedding shape {tuple(mean.shape)} != [K, {tokens}, {dim}] "
            "(wrong text encoder or embedding kind?)"
        )
    if ids.dtype != torch.int64 or counts.dtype != torch.int64:
        raise PayloadError("class_ids and counts must be int64")
    if not (len(ids) == len(counts) == len(mean)) or len(ids) == 0:
        raise PayloadError(
            f"{len(mean)} means, {len(ids)} class ids, {len(counts)} counts"
        )
    bad = [int(i) for i in ids if not 0 <= int(i) < num_classes]
    if bad:
        raise PayloadError(f"unknown class id(s) {bad} (num-classes={num_classes})")
    if len(set(ids.tolist())) != len(ids):
        raise PayloadError("duplicate class ids")
    if (counts <= 0).any():
        raise PayloadError("counts must be positive")
    check_finite({"mean": mean})


def validate_state_dict(
    reply: Reply,
    reference: dict[str, torch.Tensor],
    max_bytes: int,
    what: str = "model",
) -> None:
    """Weights must match the reference's keys, shapes and be finite."""
    if reply.upload_bytes > max_bytes:
        raise PayloadError(
            f"upload of {reply.upload_bytes} bytes exceeds max-upload-mb"
        )
    got, want = set(reply.tensors), set(reference)
    if got != want:
        extra, missing = sorted(got - want)[:3], sorted(want - got)[:3]
        raise PayloadError(f"{what} keys differ: unexpected {extra}, missing {missing}")
    for k, ref in reference.items():
        if tuple(reply.tensors[k].shape) != tuple(ref.shape):
            raise PayloadError(
                f"{what} tensor {k!r} has shape {tuple(reply.tensors[k].shape)}, "
                f"expected {tuple(ref.shape)}"
            )
    check_finite(reply.tensors)
    if reply.num_examples <= 0:
        raise PayloadError(f"num-examples={reply.num_examples} must be positive")


def config_record(values: dict[str, Any]) -> ConfigRecord:
    """A flat ConfigRecord (Flower forbids nested dicts)."""
    return ConfigRecord({k: v for k, v in values.items() if v is not None})
