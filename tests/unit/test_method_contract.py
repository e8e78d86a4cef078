"""The server half's contract every registered method keeps: an upload is read
through one hook, ``unpack``, by ``validate`` at collection (and at resume) and
by ``server_work``, so what was accepted is what is used."""

from __future__ import annotations

import pytest

from common.contract import PayloadError, Reply
from methods import METHODS, build_config
from methods.base import OneShotMethod, ServerContext

UPLOADING = [name for name, cls in METHODS.items() if cls.payload_key is not None]


def _reply() -> Reply:
    return Reply(
        node_id=1, partition_id=0, num_examples=4, upload_bytes=0, meta={}, metrics={}
    )


def test_the_uploading_methods_are_found():
    # every method with a payload record, the model- and feature-based alike
    assert {"oscar", "fedavg", "dense", "lora", "fedbip", "dosfl"} <= set(UPLOADING)
    assert "zero_shot" not in UPLOADING and "public-only" not in UPLOADING


@pytest.mark.parametrize("name", UPLOADING)
def test_a_method_with_an_upload_reads_it_through_its_unpack(
    name, monkeypatch, fast_config, tmp_path
):
    cls = METHODS[name]
    # its own reading of its payload, not the base's "nothing to read"
    assert cls.unpack is not OneShotMethod.unpack, f"{name} defines no unpack"

    def refuse(self, reply, ctx):
        raise PayloadError(f"{name}: unpack reached")

    monkeypatch.setattr(cls, "unpack", refuse)
    ctx = ServerContext(build_config(fast_config | {"method": name}), tmp_path)
    with pytest.raises(PayloadError, match=f"{name}: unpack reached"):
        cls().validate(_reply(), ctx)


def test_validate_defaults_to_unpack():
    seen: list[Reply] = []

    class Counting(OneShotMethod):
        def unpack(self, reply, ctx):
            seen.append(reply)
            if reply.num_examples < 1:
                raise PayloadError("num_examples < 1")
            return reply.num_examples

    r = _reply()
    Counting().validate(r, None)  # type: ignore[arg-type]
    assert seen == [r]
    r.num_examples = 0
    with pytest.raises(PayloadError, match="num_examples < 1"):
        Counting().validate(r, None)  # type: ignore[arg-type]
    assert OneShotMethod().unpack(r, None) is None  # type: ignore[arg-type]
