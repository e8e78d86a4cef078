"""FedDISC on a Stable-Diffusion-format generator (the hub path): the image-embedding
centres are carried into the caption token-sequence space the UNet attends to."""

from __future__ import annotations

import pytest
import torch
from tiny_stack import make_tiny_sd

from common.config import ConfigError
from common.contract import Reply
from common.datasets import dataset_info
from methods import build_config
from methods.base import ServerContext
from methods.feddisc import FedDisc
from methods.feddisc import payload_feddisc as P
from methods.feddisc.client_feddisc import prototypes


def _reply(pid: int, dim: int, classes: list[int]) -> Reply:
    g = torch.Generator().manual_seed(pid)
    labels = torch.tensor(classes * 6)
    emb = torch.nn.functional.normalize(
        torch.randn(len(labels), dim, generator=g), dim=1
    )
    tensors = {
        k: v.half() if v.is_floating_point() else v
        for k, v in P.layout(prototypes(emb, labels, 2, seed=pid)).items()
    }
    return Reply(pid + 1, pid, len(labels), 1000, {}, {}, tensors)


def test_a_sequence_conditioned_generator_gets_mapped_token_sequences(
    fast_config, tmp_path
):
    sd = make_tiny_sd(tmp_path / "sd")
    cfg = build_config(
        fast_config
        | {
            "method": "feddisc",
            "generator": str(sd),
            "text-encoder": str(sd),
            "embedding": "sequence",
            "images-per-class": 2,
            "feddisc-clusters": 2,
            "feddisc-map-pairs": 200,
            "scheduler": "ddim",
        }
    )
    ctx = ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))
    method = FedDisc()
    method.check(ctx)
    L, D = method.cond_shape
    assert (L, D) == tuple(ctx.text_encoder.encode(["a"], "sequence").shape[1:])
    # the modality gap is measured in the sequence space (no raw cosine: the
    # image and sequence spaces differ in size)
    assert set(method.gap) == {"paired_cosine_mapped", "centroid_distance_mapped"}
    replies = [_reply(0, method.image_dim, [1, 2]), _reply(1, method.image_dim, [3])]
    for r in replies:
        method.validate(r, ctx)
    seen: list[tuple[int, ...]] = []
    hook = ctx.generator.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple(kw["encoder_hidden_states"].shape[1:])),
        with_kwargs=True,
    )
    decoded: list[tuple[int, ...]] = []
    hook2 = ctx.generator.vae.decoder.register_forward_hook(
        lambda m, a, o: decoded.append(tuple(a[0].shape[1:]))
    )
    out = method.server_work(replies, ctx)
    hook.remove()
    hook2.remove()
    assert seen and set(seen) == {(L, D)}  # the UNet attends to mapped sequences
    assert decoded and set(decoded) == {(4, 4, 4)}  # latents through the VAE
    assert out.extra["num_synthetic"] == 3 * 2  # 3 (client, class) cells x 2
    assert all(torch.isfinite(v.float()).all() for v in out.model_state.values())


def test_a_dataset_without_public_pairs_is_refused_before_any_client(
    fast_config, tmp_path
):
    from tiny_stack import make_image_folder

    folder = make_image_folder(tmp_path / "folder", 4)
    cfg = build_config(fast_config | {"method": "feddisc", "dataset": str(folder)})
    ctx = ServerContext(cfg, tmp_path, info=None)
    with pytest.raises(ConfigError, match="public .*pairs.*has none"):
        FedDisc().check(ctx)
