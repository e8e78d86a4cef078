import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from common import contract as C
from common.contract import PayloadError
from methods.fedavg import payload_fedavg
from methods.oscar import payload_oscar

EMB = payload_oscar.RECORD


def _reply(mean, ids, counts, meta=None, max_bytes=None):
    content = C.pack_reply(
        {"partition-id": 0, "embedding": "pooled", **(meta or {})},
        {"num-examples": 10},
        {EMB: {"mean": mean, "class_ids": ids, "counts": counts}},
    )
    return C.unpack_reply(5, content, EMB, max_bytes)


def _validate(r):
    return payload_oscar.unpack(r.tensors, num_classes=10, tokens=1, dim=8)


def test_array_record_round_trip_keeps_shapes_and_sends_bf16_as_fp16():
    t = {
        "scalar": torch.tensor(3),
        "w": torch.randn(2, 3),
        "b": torch.ones(2, dtype=torch.bfloat16),
    }
    rec = C.to_array_record(t)
    assert isinstance(rec, ArrayRecord)
    back = C.from_array_record(rec)
    assert back["scalar"].shape == () and int(back["scalar"]) == 3
    assert torch.equal(back["w"], t["w"])
    assert back["b"].dtype == torch.float16
    half = C.from_array_record(C.to_array_record({"w": t["w"]}, half=True))
    assert half["w"].dtype == torch.float16


def test_valid_embeddings_pass_and_bytes_are_counted():
    mean = torch.randn(3, 1, 8, dtype=torch.float16)
    r = _reply(mean, torch.tensor([0, 4, 9]), torch.tensor([5, 1, 2]))
    _validate(r)
    raw = 3 * 8 * 2 + 3 * 8 + 3 * 8  # fp16 means + int64 ids + int64 counts
    # what travels = the raw tensors + one .npy header per array + meta and metrics
    assert raw < r.upload_bytes <= raw + 3 * 160 + 200


@pytest.mark.parametrize(
    "mean,ids,counts,needle",
    [
        (torch.randn(2, 1, 7), [0, 1], [1, 1], "mean has shape"),
        (torch.full((2, 1, 8), float("nan")), [0, 1], [1, 1], "NaN"),
        (torch.tensor([[[float("inf")] * 8]] * 2), [0, 1], [1, 1], "NaN or Inf"),
        (torch.randn(2, 1, 8), [0, 12], [1, 1], "outside"),
        (torch.randn(2, 1, 8), [3, 3], [1, 1], "repeats"),
        (torch.randn(2, 1, 8), [0, 1], [1, 0], "counts must be in"),
        (torch.randn(2, 1, 8), [0], [1], "class ids"),
    ],
)
def test_malformed_embeddings_are_rejected_with_reason(mean, ids, counts, needle):
    r = _reply(mean.half(), torch.tensor(ids), torch.tensor(counts))
    with pytest.raises(PayloadError, match=needle):
        _validate(r)


def test_too_large_upload_is_rejected():
    with pytest.raises(PayloadError, match="exceeds max-upload-mb"):
        _reply(
            torch.randn(1, 1, 8).half(),
            torch.tensor([0]),
            torch.tensor([1]),
            max_bytes=10,
        )


def test_unpack_requires_meta_metrics_and_schema():
    from flwr.app import RecordDict

    with pytest.raises(PayloadError, match="meta"):
        C.unpack_reply(1, RecordDict(), None)
    content = C.pack_reply({"partition-id": 0}, {"num-examples": 1})
    C.unpack_reply(1, content, None)
    content[C.KEY_META]["schema"] = 99
    with pytest.raises(PayloadError, match="schema"):
        C.unpack_reply(1, content, None)


def _model_reply(tensors):
    content = C.pack_reply(
        {"partition-id": 1}, {"num-examples": 4}, {payload_fedavg.RECORD: tensors}
    )
    return C.unpack_reply(1, content, payload_fedavg.RECORD)


def test_state_dict_validation():
    ref = {"w": torch.zeros(2, 2), "n": torch.tensor(0)}
    good = _model_reply({"w": torch.ones(2, 2), "n": torch.tensor(3)})
    payload_fedavg.unpack(good.tensors, ref)
    bad = _model_reply({"w": torch.ones(3, 2), "n": torch.tensor(3)})
    with pytest.raises(PayloadError, match="shape"):
        payload_fedavg.unpack(bad.tensors, ref)
    extra = _model_reply({"w": torch.ones(2, 2), "x": np.float32(1) * torch.ones(1)})
    with pytest.raises(PayloadError, match="keys differ"):
        payload_fedavg.unpack(extra.tensors, ref)
    ints = _model_reply(
        {"w": torch.ones(2, 2, dtype=torch.int32), "n": torch.tensor(3)}
    )
    with pytest.raises(PayloadError, match="floating point"):
        payload_fedavg.unpack(ints.tensors, ref)


def test_check_int_ids_messages():
    ids = torch.tensor([3, 1, 3])
    assert C.check_int_ids(torch.tensor([2, 0, 1]), "class_ids", 3) == [2, 0, 1]
    with pytest.raises(PayloadError, match="class_ids repeats an id"):
        C.check_int_ids(ids, "class_ids", 10)
    with pytest.raises(PayloadError, match=r"value\(s\) \[-1, 10\] outside \[0, 10\)"):
        C.check_int_ids(torch.tensor([0, -1, 10]), "class_ids", 10)
    with pytest.raises(
        PayloadError, match="3 entries for one id in class_ids, more than k=2"
    ):
        C.check_int_ids(torch.tensor([1, 1, 1]), "class_ids", 10, 2, "k")
    C.check_int_ids(ids, "class_ids", 10, 2, "k")  # twice is allowed
    assert C.check_int_ids(torch.tensor([], dtype=torch.int64), "class_ids", 10) == []
    with pytest.raises(PayloadError, match="dtype"):
        C.check_int_ids(ids.int(), "class_ids", 10)


def test_check_int_ids_is_linear_on_400k_ids():
    """400,000 ids of 100,000 classes (4 each): the count-per-id scan this replaced
    took ids x classes steps; bincount takes one pass."""
    import time

    ids = torch.arange(400_000) % 100_000
    t0 = time.perf_counter()
    C.check_int_ids(ids, "class_ids", 100_000, 4, "k")
    assert time.perf_counter() - t0 < 5.0
    ids[123_456] = 7  # id 7 now 5 times
    with pytest.raises(PayloadError, match="5 entries for one id"):
        C.check_int_ids(ids, "class_ids", 100_000, 4, "k")
    ids[5] = 100_000
    with pytest.raises(PayloadError, match=r"\[100000\] outside"):
        C.check_int_ids(ids, "class_ids", 100_000, 4, "k")


@pytest.mark.parametrize(
    ("t", "error"),
    [
        (torch.zeros(2, 1, 4, dtype=torch.int64), "x has dtype torch.int64"),
        (torch.zeros(2, 4), "x has shape (2, 4), expected [K, 1, 4] (hint)"),
        (torch.zeros(2, 1, 5), "x has shape (2, 1, 5), expected [K, 1, 4] (hint)"),
        (torch.zeros(0, 1, 4), "x has 0 rows, expected >= 1"),
        (torch.full((2, 1, 4), float("inf")), "contains NaN or Inf"),
    ],
)
def test_check_rows_names_what_is_wrong(t, error):
    with pytest.raises(PayloadError) as e:
        C.check_rows(t, "x", (1, 4), "hint", rows="K")
    assert error in str(e.value)
    C.check_rows(torch.zeros(3, 1, 4, dtype=torch.float16), "x", (1, 4), "hint")
