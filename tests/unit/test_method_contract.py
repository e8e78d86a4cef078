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


def test_a_synthesis_method_reads_conditions_through_its_payload_module():
    """A ``SynthesisMethod`` declared with ``payload=`` reads its upload with the
    module's ``unpack`` at the server's conditioning shape and its
    ``conditions_limits``; another embedding kind is refused first."""
    from types import SimpleNamespace

    import torch

    from methods.steps import SynthesisMethod

    calls: list[dict] = []

    def unpack(tensors, **kw):
        calls.append(kw)
        return tensors

    payload = SimpleNamespace(COLLECT_TYPE="train.x", RECORD="x", unpack=unpack)

    class Plain(SynthesisMethod, payload=payload):  # type: ignore[arg-type]
        pass

    class Bounded(SynthesisMethod, payload=payload):  # type: ignore[arg-type]
        def conditions_limits(self, ctx):
            return {"per_class": ctx.cfg.k}

    ctx = SimpleNamespace(
        cfg=SimpleNamespace(embedding="pooled", k=3),
        uncond=torch.zeros(1, 1, 8),
        generator=SimpleNamespace(cond_dim=8),
        num_classes=5,
    )
    r = _reply()
    r.meta = {"embedding": "pooled"}
    assert Plain.payload_module is payload and Plain.payload_key == "x"
    assert Plain().unpack(r, ctx) is r.tensors  # type: ignore[arg-type]
    Bounded().unpack(r, ctx)  # type: ignore[arg-type]
    assert calls == [
        {"num_classes": 5, "tokens": 1, "dim": 8},
        {"num_classes": 5, "tokens": 1, "dim": 8, "per_class": 3},
    ]
    r.meta = {"embedding": "sequence"}
    with pytest.raises(PayloadError, match="embedding kind 'sequence'"):
        Bounded().unpack(r, ctx)  # type: ignore[arg-type]


def test_a_method_is_declared_by_its_folder():
    """Name from the folder (``server_<folder>`` module, ``_`` as ``-``), config
    and privacy guard from the class keywords; a class elsewhere, or one that
    sets its name, keeps what it says."""
    import types

    from pydantic import BaseModel

    class MineConfig(BaseModel):
        pass

    guarded = types.SimpleNamespace(collect=lambda job: None, PRIVATE_UPLOADS=True)
    plain = types.SimpleNamespace(collect=lambda job: None)
    made = {}
    for module in ("extra.my_method.server_my_method", "tests.unit.helpers"):
        ns = {"__module__": module}
        made[module] = types.new_class(
            "Mine",
            (OneShotMethod,),
            {"client": guarded, "config": MineConfig},
            lambda d, ns=ns: d.update(ns),
        )
    mine = made["extra.my_method.server_my_method"]
    assert mine.name == "my-method" and mine.config is MineConfig
    assert mine.private_uploads and made["tests.unit.helpers"].name == ""
    # a subclass with another client module is guarded only if that one says so
    sub = types.new_class(
        "Sub",
        (mine,),
        {"client": plain},
        lambda d: d.update(__module__=mine.__module__),
    )
    assert not sub.private_uploads and sub.config is MineConfig
    named = types.new_class(
        "Named",
        (OneShotMethod,),
        {},
        lambda d: d.update(name="x", __module__="a.b.server_b"),
    )
    assert named.name == "x"


def test_every_registered_method_is_named_by_its_folder():
    from methods import FOLDERS

    assert list(METHODS) == [f.replace("_", "-") for f in FOLDERS]
    for name, cls in METHODS.items():
        assert cls.name == name == cls.__module__.split(".")[-2].replace("_", "-")
    # the four whose client has a DP mechanism (tests/methods/test_dp_methods.py)
    guarded = {n for n, cls in METHODS.items() if cls.private_uploads}
    assert guarded == {"oscar", "lora", "feddisc", "feddeo"}
