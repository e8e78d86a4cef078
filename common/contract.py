"""Generic record helpers shared by every method's payload module.

Tensors <-> Flower records, and the envelope every reply carries:

* ``meta`` (ConfigRecord): ``schema``, ``partition-id``, ``num-partitions``,
  ``domain``, ``class-names`` (comma-separated), ``channels`` and the method's own
  scalar fields;
* ``metrics`` (MetricRecord): ``num-examples``, ``client-s`` and the method's own
  numbers;
* at most one ArrayRecord, the method's payload (its layout is written in
  ``methods/<name>/payload_<name>.py``).

``unpack_reply`` is total: whatever a client sends, it returns a ``Reply`` or
raises ``PayloadError`` with the reason; it never lets another exception out.
Every byte a client sends (arrays, strings, numbers) counts toward the upload limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

KEY_CONFIG = "config"  # server -> client: ConfigRecord with round instructions
KEY_META = "meta"  # client -> server: ConfigRecord
KEY_METRICS = "metrics"  # client -> server: MetricRecord
KEY_MODEL = "model"  # ArrayRecord: a classifier state dict (push-back)

SCHEMA_VERSION = 2

# Bounds on what a client declares (a reply outside them is rejected)
MAX_PARTITIONS = 1 << 20
MAX_EXAMPLES = 10**9
MAX_STRING = 64 * 1024  # one meta string (class names of a large dataset fit)
MAX_CLASSES = 100_000
NO_PARTITION = -1  # Reply.partition_id of a device that declared none
FLOAT_DTYPES = (torch.float16, torch.float32, torch.bfloat16, torch.float64)


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
        out[k] = Array(t.contiguous().numpy())  # keeps 0-d shapes
    return ArrayRecord(out)


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors; ``PayloadError`` for anything torch cannot hold."""
    out: dict[str, torch.Tensor] = {}
    for k, v in record.items():
        try:
            arr = np.array(v.numpy(), copy=True)
            out[str(k)] = torch.from_numpy(arr)
        except Exception as e:  # a corrupt array is one client's problem
            raise PayloadError(
                f"array {_short(k)!r} cannot be decoded: {_short(e)}"
            ) from None
    return out


def _value_nbytes(v: Any) -> int:
    if isinstance(v, str | bytes):
        return len(v)
    if isinstance(v, list):
        return sum(_value_nbytes(x) for x in v)
    return 8


def record_nbytes(content: RecordDict) -> int:
    """Every byte a message carries: array data, config strings and numbers."""
    n = 0
    for rec in content.array_records.values():
        n += sum(len(a.data) for a in rec.values())
    for cfg in content.config_records.values():
        n += sum(len(str(k)) + _value_nbytes(v) for k, v in cfg.items())
    for met in content.metric_records.values():
        n += sum(len(str(k)) + _value_nbytes(v) for k, v in met.items())
    return n


def config_record(values: dict[str, Any]) -> ConfigRecord:
    """A flat ConfigRecord (Flower forbids nested dicts)."""
    return ConfigRecord({k: v for k, v in values.items() if v is not None})


def _short(x: Any, n: int = 120) -> str:
    """Client-supplied text, escaped and truncated, for reasons and reports."""
    s = repr(x) if not isinstance(x, str) else x
    s = s.encode("unicode_escape", "replace").decode("ascii", "replace")
    return s if len(s) <= n else s[:n] + f"...(+{len(s) - n} chars)"


def safe_text(x: Any, n: int = 120) -> str:
    """Public form of ``_short``: what a report may print of client input."""
    return _short(x, n)


# ---------------------------------------------------------------- the envelope


@dataclass
class Reply:
    """What the server keeps of one client's reply after validation."""

    node_id: int
    # the client's id in the round: its partition of a benchmark split, or one the
    # round assigns to a device with its own data (NO_PARTITION until then)
    partition_id: int
    num_examples: int
    upload_bytes: int
    meta: dict[str, Any]
    metrics: dict[str, float]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The class names the client reported (meta ``class-names``), or None."""
        names = self.meta.get("class-names")
        return tuple(names.split(",")) if isinstance(names, str) and names else None

    @property
    def channels(self) -> int | None:
        """The image channels the client reported (meta ``channels``), or None."""
        ch = self.meta.get("channels")
        return ch if isinstance(ch, int) else None


def pack_reply(
    meta: dict[str, Any],
    metrics: dict[str, float],
    arrays: dict[str, dict[str, torch.Tensor]] | None = None,
    half: bool = False,
) -> RecordDict:
    """A client's reply: ``meta`` (with the schema version), ``metrics`` and
    one ArrayRecord per entry of ``arrays``.

    Parameters
    ----------
    meta : dict
        Scalars the server reads (domain, partition id, class names, ...).
    metrics : dict
        Float metrics of the client's work.
    arrays : dict, optional
        ``{record key: {tensor name: tensor}}``, one ArrayRecord each.
    half : bool
        Send floating-point tensors as float16.
    """
    content = RecordDict()
    content[KEY_META] = ConfigRecord({**meta, "schema": SCHEMA_VERSION})
    content[KEY_METRICS] = MetricRecord(dict(metrics))  # type: ignore[arg-type]
    for key, tensors in (arrays or {}).items():
        content[key] = to_array_record(tensors, half=half)
    return content


def _check_meta(meta: dict[str, Any]) -> None:
    for k, v in meta.items():
        if not isinstance(k, str) or len(k) > 64:
            raise PayloadError(f"meta key {_short(k)!r} is not a short string")
        if isinstance(v, str | bytes) and len(v) > MAX_STRING:
            raise PayloadError(
                f"meta {k!r} is {len(v)} characters long (limit {MAX_STRING})"
            )
        if not isinstance(v, str | bool | int | float):
            raise PayloadError(
                f"meta {k!r} has type {type(v).__name__}: expected a scalar"
            )
        if isinstance(v, float) and not math.isfinite(v):
            raise PayloadError(f"meta {k!r} is {v}")


def _int_field(
    value: Any, name: str, lo: int, hi: int, allow_float: bool = False
) -> int:
    """An integer in ``[lo, hi)``; an integral float only where ``allow_float``
    (MetricRecord numbers travel as floats)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{name}={_short(value)} is not an integer")
    if isinstance(value, float) and not (
        allow_float and math.isfinite(value) and value.is_integer()
    ):
        raise PayloadError(f"{name}={_short(value)} is not an integer")
    if not lo <= value < hi:
        raise PayloadError(f"{name}={_short(value)} is outside [{lo}, {hi})")
    return int(value)


def _metrics(record: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise PayloadError(
                f"metric {_short(k)!r} is a {type(v).__name__}: expected one number"
            )
        v = float(v)
        if not math.isfinite(v):
            raise PayloadError(f"metric {_short(k)!r} is {v}")
        out[str(k)] = v
    return out


def unpack_reply(
    node_id: int,
    content: RecordDict,
    payload_key: str | None,
    max_bytes: int | None = None,
) -> Reply:
    """Check the envelope of one reply; raise ``PayloadError`` with the reason.

    Total: any failure while reading the reply becomes a ``PayloadError``.
    """
    try:
        return _unpack_reply(node_id, content, payload_key, max_bytes)
    except PayloadError:
        raise
    except Exception as e:  # anything a hostile reply can trigger
        raise PayloadError(
            f"malformed reply ({e.__class__.__name__}: {_short(e)})"
        ) from None


def _unpack_reply(
    node_id: int, content: RecordDict, payload_key: str | None, max_bytes: int | None
) -> Reply:
    upload_bytes = record_nbytes(content)
    if max_bytes is not None and upload_bytes > max_bytes:
        raise PayloadError(
            f"upload of {upload_bytes} bytes exceeds max-upload-mb ({max_bytes} bytes)"
        )
    if KEY_META not in content.config_records:
        raise PayloadError(f"reply has no '{KEY_META}' ConfigRecord")
    if KEY_METRICS not in content.metric_records:
        raise PayloadError(f"reply has no '{KEY_METRICS}' MetricRecord")
    meta = dict(content.config_records[KEY_META])
    _check_meta(meta)
    metrics = _metrics(content.metric_records[KEY_METRICS])
    if meta.get("schema") != SCHEMA_VERSION:
        raise PayloadError(
            f"schema={_short(meta.get('schema'))}, expected {SCHEMA_VERSION} "
            "(client and server run different versions of the app)"
        )
    # A device with its own data declares no partition: the round assigns its id.
    partition_id = (
        _int_field(meta["partition-id"], "partition-id", 0, MAX_PARTITIONS)
        if "partition-id" in meta
        else NO_PARTITION
    )
    if "num-examples" not in metrics:
        raise PayloadError("metric 'num-examples' is missing")
    num_examples = _int_field(
        metrics["num-examples"], "num-examples", 1, MAX_EXAMPLES, allow_float=True
    )
    names = meta.get("class-names")
    if names is not None:
        if not isinstance(names, str) or not names:
            raise PayloadError(f"class-names={_short(names)} is not a non-empty string")
        split = names.split(",")
        if len(split) > MAX_CLASSES or any(not n for n in split):
            raise PayloadError(f"class-names={_short(names)} is not a list of names")
        if len(set(split)) != len(split):
            raise PayloadError(f"class-names={_short(names)} repeats a name")
    if "channels" in meta:
        _int_field(meta["channels"], "channels", 1, 5)
    extra = set(content.array_records) - ({payload_key} if payload_key else set())
    if extra:
        raise PayloadError(f"unexpected ArrayRecord(s) {sorted(map(_short, extra))}")
    tensors: dict[str, torch.Tensor] = {}
    if payload_key is not None:
        if payload_key not in content.array_records:
            raise PayloadError(f"reply has no '{payload_key}' ArrayRecord")
        tensors = from_array_record(content.array_records[payload_key])
    return Reply(
        node_id=int(node_id),
        partition_id=partition_id,
        num_examples=num_examples,
        upload_bytes=upload_bytes,
        meta=meta,
        metrics=metrics,
        tensors=tensors,
    )


# ---------------------------------------------------------------- tensor checks


def require(
    tensors: dict[str, torch.Tensor], key: str, what: str = "payload"
) -> torch.Tensor:
    """``tensors[key]``, or ``PayloadError`` naming ``what`` lacks it."""
    if key not in tensors:
        raise PayloadError(f"{what} lacks {key!r} (has {sorted(tensors)[:5]})")
    return tensors[key]


def check_float(t: torch.Tensor, name: str) -> None:
    """A floating tensor with finite values (weights, embeddings)."""
    if t.dtype not in FLOAT_DTYPES:
        raise PayloadError(
            f"tensor {name!r} has dtype {t.dtype}, expected floating point"
        )
    if not torch.isfinite(t.float()).all():
        raise PayloadError(f"tensor {name!r} contains NaN or Inf")


# What a conditioning vector of the wrong shape most likely means.
EMBEDDING_HINT = "wrong text encoder or embedding kind?"
# ... and a latent of the wrong shape.
LATENT_HINT = (
    "the latent shape of the server's generator: same generator on both sides?"
)


def check_rows(
    t: torch.Tensor,
    name: str,
    shape: tuple[int, ...],
    hint: str,
    rows: str = "N",
    min_rows: int = 1,
) -> None:
    """An upload of per-row vectors (embeddings, latents, learned tokens):
    float16 (or float32) of shape ``[rows >= min_rows, *shape]``, finite.

    ``hint`` says in the error what a wrong shape most likely means (another
    text encoder or generator on the client)."""
    if t.dtype not in (torch.float16, torch.float32):
        raise PayloadError(f"{name} has dtype {t.dtype}, expected float16")
    if t.ndim != 1 + len(shape) or tuple(t.shape[1:]) != tuple(shape):
        raise PayloadError(
            f"{name} has shape {tuple(t.shape)}, expected [{rows}, "
            f"{', '.join(map(str, shape))}] ({hint})"
        )
    if len(t) < min_rows:
        raise PayloadError(f"{name} has {len(t)} rows, expected >= {min_rows}")
    check_float(t, name)


def check_int_ids(
    t: torch.Tensor, name: str, hi: int, max_repeat: int = 1, what: str = ""
) -> list[int]:
    """A 1-d int64 tensor of ids in ``[0, hi)``, none more than ``max_repeat``
    times (1: distinct); ``what`` names the key that sets ``max_repeat``."""
    if t.dtype != torch.int64:
        raise PayloadError(f"{name} has dtype {t.dtype}, expected int64")
    if t.ndim != 1:
        raise PayloadError(f"{name} has shape {tuple(t.shape)}, expected 1-d")
    # O(ids + hi), not O(ids x classes): a client may send a million ids
    bad = t[(t < 0) | (t >= hi)]
    if len(bad):
        raise PayloadError(f"{name} has value(s) {bad[:5].tolist()} outside [0, {hi})")
    most = int(torch.bincount(t).max()) if len(t) else 0
    if max_repeat == 1 and most > 1:
        raise PayloadError(f"{name} repeats an id")
    if most > max_repeat:
        raise PayloadError(
            f"{most} entries for one id in {name}, more than {what}={max_repeat}"
        )
    return t.tolist()


def check_state_dict(
    tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str
) -> None:
    """Weights with the reference's keys, shapes and floating/integer kinds, finite."""
    got, want = set(tensors), set(reference)
    if got != want:
        extra, missing = sorted(got - want)[:3], sorted(want - got)[:3]
        raise PayloadError(
            f"{what} keys differ: unexpected {[_short(k) for k in extra]}, missing {missing}"
        )
    for k, ref in reference.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise PayloadError(
                f"{what} tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
            )
        if ref.is_floating_point():
            check_float(t, k)
        elif t.dtype != ref.dtype:
            raise PayloadError(
                f"{what} tensor {k!r} has dtype {t.dtype}, expected {ref.dtype}"
            )
