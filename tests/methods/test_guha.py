"""methods.guha: selection and ensemble maths by hand, the payload checks, and the
server side with mock uploads (no Grid): which models enter the ensemble under
each selection, distillation on the server's public images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.config import ConfigError
from common.contract import PayloadError, Reply
from common.datasets import dataset_info
from methods import build_config
from methods.base import ServerContext
from methods.guha import Guha
from methods.guha import payload_guha as P
from methods.guha.server_guha import ensemble_probs, ensemble_size, select


def test_select_and_ensemble_size_by_hand():
    assert select([0.2, 0.9, 0.5, 0.9], 2) == [1, 3]  # ties to the earlier
    assert select([0.2, 0.9, 0.5], 1) == [1]
    assert select([0.1, 0.1, 0.1], 2) == [0, 1]
    assert ensemble_size(3, 0.5) == 2  # ceil(1.5)
    assert ensemble_size(4, 0.5) == 2
    assert ensemble_size(5, 0.01) == 1
    assert ensemble_size(5, 1.0) == 5


class Fixed(nn.Module):
    """A 'model' that outputs the same logits for every image."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_ensemble_averages_probabilities_not_logits():
    # softmax([0, ln 3]) = (.25, .75); softmax([ln 3, 0]) = (.75, .25); mean (.5, .5)
    ln3 = float(torch.log(torch.tensor(3.0)))
    p = ensemble_probs([Fixed([0.0, ln3]), Fixed([ln3, 0.0])], torch.zeros(2, 1, 4, 4))
    assert p.shape == (2, 2)
    assert torch.allclose(p, torch.full((2, 2), 0.5))
    # with a very confident third member the average is not the logit average's
    p3 = ensemble_probs(
        [Fixed([0.0, ln3]), Fixed([ln3, 0.0]), Fixed([0.0, 50.0])],
        torch.zeros(1, 1, 4, 4),
    )
    assert torch.allclose(
        p3[0], torch.tensor([(0.25 + 0.75) / 3, (0.75 + 0.25 + 1) / 3])
    )


def _ctx(fast_config, tmp_path, **over) -> ServerContext:
    rc = fast_config | {
        "method": "guha",
        "guha-distill-images": 300,
        "guha-validation-images": 200,
    }
    cfg = build_config(rc | over)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _reply(method: Guha, ctx, pid: int, acc: float, n: int) -> Reply:
    torch.manual_seed(100 + pid)
    state = {
        k: (v + 0.1 * torch.randn_like(v)) if v.is_floating_point() else v
        for k, v in method.reference_state(ctx).items()
    }
    return Reply(pid + 1, pid, n, 1000, {}, {P.VALIDATION: acc}, state)


def test_payload_needs_the_validation_accuracy(fast_config, tmp_path):
    ctx = _ctx(fast_config, tmp_path)
    method = Guha()
    r = _reply(method, ctx, 0, 0.8, 50)
    method.validate(r, ctx)
    for bad in ({}, {P.VALIDATION: 1.5}, {P.VALIDATION: -0.1}):
        r.metrics = bad
        with pytest.raises(PayloadError, match="validation-accuracy"):
            method.validate(r, ctx)
    r.metrics = {P.VALIDATION: 0.5}
    r.tensors = dict(r.tensors) | {"evil": torch.zeros(1)}
    with pytest.raises(PayloadError, match="keys differ"):
        method.validate(r, ctx)


@pytest.mark.parametrize(
    "selection,members",
    [
        ("client-cv", [1, 2]),  # the two best self-reported accuracies
        ("data", [0, 2]),  # the two with most examples
        ("all", [0, 1, 2]),
    ],
)
def test_selection_picks_the_ensemble(selection, members, fast_config, tmp_path):
    ctx = _ctx(fast_config, tmp_path, **{"guha-selection": selection})
    method = Guha()
    method.check(ctx)
    replies = [
        _reply(method, ctx, 0, 0.30, 90),
        _reply(method, ctx, 1, 0.90, 20),
        _reply(method, ctx, 2, 0.60, 80),
    ]
    out = method.server_work(replies, ctx)
    rep = out.extra["guha"]
    assert rep["ensemble"] == members
    assert rep["client_cv"] == {"0": 0.3, "1": 0.9, "2": 0.6}
    assert set(rep["server_cv"]) == {"0", "1", "2"}
    assert rep["server_validation_images"] == 200
    assert 0 <= rep["distilled_server_accuracy"] <= 1
    assert all(torch.isfinite(v.float()).all() for v in out.model_state.values())
    assert out.timings["train"] > 0 and "num_synthetic" not in out.extra


def test_server_cv_ranks_by_the_servers_labelled_images(fast_config, tmp_path):
    ctx = _ctx(fast_config, tmp_path, **{"guha-selection": "server-cv"})
    method = Guha()
    method.check(ctx)
    replies = [_reply(method, ctx, p, 1.0 - p / 10, 30) for p in range(3)]
    out = method.server_work(replies, ctx)
    rep = out.extra["guha"]
    scores = rep["server_cv"]
    best = sorted(scores, key=lambda p: (-scores[p], int(p)))[:2]
    assert rep["ensemble"] == sorted(int(p) for p in best)


def test_a_dataset_without_public_images_is_refused_before_any_client(
    fast_config, tmp_path
):
    from tiny_stack import make_image_folder

    folder = make_image_folder(tmp_path / "folder", 4)
    cfg = build_config(fast_config | {"method": "guha", "dataset": str(folder)})
    with pytest.raises(ConfigError, match="public images"):
        Guha().check(ServerContext(cfg, tmp_path, info=None))
