"""methods.lora on the server side: the merges as the round calls them."""

from __future__ import annotations

import pytest
import torch
from tiny_stack import make_tiny_sd

from common.contract import Reply
from common.datasets import dataset_info
from common.lora import attach_lora, get_lora_state
from common.lora_merge import merge_adapters
from methods import build_config
from methods.base import ServerContext, ServerOutput
from methods.lora.config_lora import LoraConfig
from methods.lora.payload_lora import ADAPTER, EMB
from methods.lora.server_lora import Lora


def _context(fast_config, tmp_path, **over) -> ServerContext:
    cfg = build_config(fast_config | {"method": "lora", "lora-rank": 2} | over)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _replies(ctx: ServerContext, n: int = 2) -> list[Reply]:
    """n clients with random non-zero adapters and two classes' embeddings each."""
    cfg, unet = ctx.cfg, ctx.generator.unet
    lcfg = cfg.options(LoraConfig)
    fingerprint = ctx.generator.fingerprint()
    emb = ctx.text_encoder.encode(["the digit one", "the digit two"], cfg.embedding)
    replies = []
    for i in range(n):
        attach_lora(unet, lcfg.lora_rank, lcfg.lora_alpha, lcfg.target_list, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        state = {
            k: v + 0.1 * torch.randn(v.shape, generator=g) if ".lora_B." in k else v
            for k, v in get_lora_state(unet).items()
        }
        unet.unload_lora()
        tensors = {ADAPTER + k: v.half() for k, v in state.items()} | {
            EMB + "mean": emb.half(),
            EMB + "class_ids": torch.tensor([1, 2]),
            EMB + "counts": torch.tensor([5, 5]),
        }
        meta = {"base-model": fingerprint, "embedding": cfg.embedding}
        replies.append(Reply(i + 1, i, 10 * (i + 1), 0, meta, {}, tensors))
    return replies


def _svd_of(replies: list[Reply], ctx: ServerContext) -> dict[str, torch.Tensor]:
    cfg = ctx.cfg.options(LoraConfig)
    adapters = [
        {k[len(ADAPTER) :]: v.float() for k, v in r.tensors.items() if ADAPTER in k}
        for r in replies
    ]
    merged, _ = merge_adapters(
        adapters,
        [1.0] * len(adapters),
        "svd",
        rank=cfg.lora_merge_rank,
        scalings=[cfg.lora_alpha / cfg.lora_rank] * len(adapters),
    )
    return merged


@pytest.mark.parametrize(("lr", "changed"), [(1e-12, False), (1e-2, True)])
def test_generative_corrects_the_svd_merge(
    tiny_stack, fast_config, tmp_path, lr, changed
):
    # With a vanishing learning rate the correction leaves the svd start as is;
    # with a real one it moves it. Either way: rank lora-merge-rank, scaling 1.
    ctx = _context(
        fast_config,
        tmp_path,
        **{
            "lora-merge": "generative",
            "lora-learning-rate": lr,
            "lora-steps": 3,
            "lora-samples-per-class": 2,
        },
    )
    method = Lora()
    method.check(ctx)
    replies = _replies(ctx)
    for r in replies:
        method.validate(r, ctx)
    out = ServerOutput()
    merged, rank, alpha = method.merge(replies, ctx, out)
    start = _svd_of(replies, ctx)
    assert rank == ctx.cfg.options(LoraConfig).lora_merge_rank and alpha == float(rank)
    assert merged.keys() == start.keys()
    diff = max(float((merged[k] - start[k]).abs().max()) for k in start)
    assert (diff > 1e-4) is changed, diff
    assert out.extra["lora"]["energy_kept"] is not None  # of the svd start
    assert out.timings["merge"] > 0


def test_generative_runs_on_a_latent_stable_diffusion_generator(fast_config, tmp_path):
    """The auxiliary samples stay latents ([4, 4, 4] here), not dataset images: the
    merge trains the UNet on what it denoises, whatever image-size is."""
    sd = make_tiny_sd(tmp_path / "sd")
    ctx = _context(
        fast_config,
        tmp_path,
        **{
            "generator": str(sd),
            "text-encoder": str(sd),
            "embedding": "sequence",
            "lora-merge": "generative",
            "lora-learning-rate": 1e-2,
            "lora-steps": 2,
            "lora-samples-per-class": 2,
            "lora-targets": "to_q,to_v",
        },
    )
    method = Lora()
    method.check(ctx)
    replies = _replies(ctx)
    for r in replies:
        method.validate(r, ctx)
    seen: list[tuple[int, ...]] = []
    hook = ctx.generator.unet.register_forward_hook(
        lambda m, a, o: seen.append(tuple(a[0].shape[1:]))
    )
    merged, rank, _ = method.merge(replies, ctx, ServerOutput())
    hook.remove()
    assert seen and set(seen) == {(4, 4, 4)}
    start = _svd_of(replies, ctx)
    assert max(float((merged[k] - start[k]).abs().max()) for k in start) > 1e-4
