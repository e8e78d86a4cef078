"""``classifier-init``: every classifier a run trains starts from the same weights.

``random``: the run seed's init; ``public``: public-only's classifier, trained
once per run on the server's public data (``methods/initial.py``).
"""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError
from common.datasets import dataset_info
from methods import build_config, steps
from methods.base import ServerContext, ServerOutput
from methods.fedavg import FedAvg
from methods.initial import check_init, initial_state, public_state, random_state
from methods.public_only import PublicOnly


def _ctx(fast_config: dict, tmp_path, **keys) -> ServerContext:
    cfg = build_config(fast_config | {"images-per-class": 2} | keys)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_public_init_is_public_only_for_min_clients_clients(
    tiny_stack, fast_config, tmp_path
):
    ctx = _ctx(
        fast_config, tmp_path, **{"classifier-init": "public"}, **{"min-clients": 2}
    )
    init = public_state(ctx)
    # public-only's global model with 2 clients: same images, draw, seed, epochs
    floor = PublicOnly().server_work([None, None], ctx)  # type: ignore[list-item]
    assert floor.model_state is not None and _equal(init, floor.model_state)
    assert floor.extra["public_only"]["images"] == 2 * 2 * 10
    assert not _equal(init, random_state(ctx))
    assert initial_state(ctx) is init  # trained once per run


def test_the_public_init_is_trained_once_per_run(
    tiny_stack, fast_config, tmp_path, monkeypatch
):
    calls = []
    fit = steps.fit_classifier
    monkeypatch.setattr(
        steps, "fit_classifier", lambda *a, **k: calls.append(1) or fit(*a, **k)
    )
    ctx = _ctx(fast_config, tmp_path, **{"classifier-init": "public"})
    public_state(ctx)
    FedAvg().reference_state(ctx)
    initial_state(ctx)
    assert len(calls) == 1 and ctx.memo["init-s"] > 0


@pytest.mark.parametrize("init", ["random", "public"])
def test_weights_sent_down_and_the_global_training_start_from_init(
    init, tiny_stack, fast_config, tmp_path, monkeypatch
):
    ctx = _ctx(fast_config, tmp_path, **{"classifier-init": init})
    want = public_state(ctx) if init == "public" else random_state(ctx)
    assert _equal(FedAvg().reference_state(ctx), want)

    starts = []
    fit = steps.fit_classifier
    monkeypatch.setattr(
        steps,
        "fit_classifier",
        lambda *a, **k: starts.append(k.get("init_state")) or fit(*a, **k),
    )
    images, labels = torch.zeros(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    steps.train_global(ctx, images, labels, ServerOutput())
    steps.train_global(ctx, images, labels, ServerOutput(), from_init=False)
    if init == "public":  # the random init is the seeded one fit_classifier makes
        assert starts[0] is want
    else:
        assert starts[0] is None
    assert starts[1] is None


def test_init_public_without_public_images_is_refused_before_any_client(
    fast_config, tmp_path
):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.new("L", (16, 16)).save(tmp_path / "data" / c / "0.png")
    ctx = _ctx(
        fast_config,
        tmp_path,
        **{"classifier-init": "public"},
        dataset=str(tmp_path / "data"),
    )
    with pytest.raises(
        ConfigError, match="classifier-init='public' trains on public images"
    ):
        check_init(ctx)
    check_init(_ctx(fast_config, tmp_path, dataset=str(tmp_path / "data")))


def test_init_is_checked_once_with_the_config():
    with pytest.raises(ConfigError, match="classifier-init = 'pretrained'"):
        build_config({"classifier-init": "pretrained"})
