"""peft glue of common.lora on a tiny UNet2DConditionModel."""

from __future__ import annotations

import pytest
import torch

from common.lora import (
    adapter_nbytes,
    attach_lora,
    get_lora_state,
    lora_parameters,
    set_lora_state,
    train_lora,
)
from common.lora_merge import delta_w, merge_adapters

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LOCON = [*TARGETS, "conv1", "conv2"]  # attention + the resnets' 3x3 convs


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=100)


def tiny_data(n: int = 8):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    cond = torch.randn(n, 3, 16, generator=g)
    return images, cond


def probe_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 8, 8, generator=g)
    c = torch.randn(2, 3, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 60]), encoder_hidden_states=c).sample


def fixed_loss(unet, sched, images, cond) -> float:
    """Denoising loss on fixed (t, ε): comparable before and after training."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(0, 100, (len(images),), generator=g)
    with torch.no_grad():
        pred = unet(sched.add_noise(images, noise, t), t, encoder_hidden_states=cond)
    return float(torch.nn.functional.mse_loss(pred.sample, noise))


def randomize_lora(unet, seed: int) -> None:
    # B starts at zero (a no-op adapter); give every factor values.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_attach_lora_trains_only_lora_and_starts_as_base():
    unet = tiny_unet()
    base_out = probe_output(unet)
    attach_lora(unet, rank=2, alpha=4.0, targets=TARGETS)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    # 4 transformer blocks (1 down, 1 mid, 2 up) · 2 attentions (self, cross)
    # · 4 targets · 2 factors (A, B) = 64 tensors.
    assert len(trainable) == 64
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    torch.testing.assert_close(probe_output(unet), base_out)
    state = get_lora_state(unet)
    assert len(state) == 64 and all("default" not in k for k in state)
    assert adapter_nbytes(state) == sum(v.numel() * 4 for v in state.values())


def test_attach_lora_rejects_unknown_target():
    unet = tiny_unet()
    with pytest.raises(ValueError, match=r"lora-targets \['to_qq'\]"):
        attach_lora(unet, rank=2, alpha=2.0, targets=["to_q", "to_qq"])
    # The model is left usable.
    attach_lora(unet, rank=2, alpha=2.0, targets=["to_q"])


def test_train_lora_lowers_loss_and_keeps_base():
    unet = tiny_unet()
    sched = scheduler()
    images, cond = tiny_data()
    attach_lora(unet, rank=4, alpha=4.0, targets=TARGETS)
    base = {k: v.clone() for k, v in unet.state_dict().items() if ".lora_" not in k}
    before = fixed_loss(unet, sched, images, cond)
    losses = train_lora(
        unet,
        sched,
        images,
        cond,
        steps=20,
        lr=1e-2,
        batch_size=8,
        uncond=torch.zeros(1, 3, 16),
    )
    after = fixed_loss(unet, sched, images, cond)
    assert len(losses) == 20
    assert after < 0.95 * before  # measured: 1.086 -> 0.991
    for k, v in unet.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, base[k]), k


def test_train_lora_is_deterministic_and_checks_inputs():
    images, cond = tiny_data(4)
    runs = []
    for _ in range(2):
        unet = attach_lora(tiny_unet(), rank=2, alpha=2.0, targets=["to_q"])
        runs.append(
            train_lora(
                unet, scheduler(), images, cond, steps=3, lr=1e-3, cond_dropout=0
            )
        )
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="needs uncond"):
        train_lora(unet, scheduler(), images, cond, steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="cond has shape"):
        train_lora(unet, scheduler(), images, cond[:2], steps=1, lr=1e-3)


def test_state_round_trip_is_exact():
    unet = attach_lora(tiny_unet(), rank=3, alpha=6.0, targets=TARGETS)
    randomize_lora(unet, seed=0)
    state = get_lora_state(unet)
    out = probe_output(unet)

    other = tiny_unet()
    set_lora_state(other, state, rank=3, alpha=6.0, targets=TARGETS)
    again = get_lora_state(other)
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)
    torch.testing.assert_close(probe_output(other), out)


def test_set_lora_state_is_strict():
    unet = attach_lora(tiny_unet(), rank=2, alpha=2.0, targets=TARGETS)
    state = get_lora_state(unet)
    key = sorted(state)[0]
    with pytest.raises(ValueError, match="missing keys"):
        set_lora_state(
            unet, {k: v for k, v in state.items() if k != key}, 2, 2.0, TARGETS
        )
    with pytest.raises(ValueError, match="unexpected keys"):
        set_lora_state(unet, {**state, "x.lora_A.weight": state[key]}, 2, 2.0, TARGETS)
    with pytest.raises(ValueError, match="rank 3"):
        set_lora_state(unet, state, rank=3, alpha=3.0, targets=TARGETS)


@pytest.mark.parametrize("merge", ["stack", "svd"])
def test_merged_adapter_equals_exact_delta(merge):
    # Two clients, rank 2, alpha 4 (scaling 2), weights 1:3, attention and conv
    # layers; svd at rank 4 >= rank(ΔW) is exact too.
    states = []
    for seed in (0, 1):
        unet = attach_lora(tiny_unet(), rank=2, alpha=4.0, targets=LOCON)
        randomize_lora(unet, seed)
        states.append(get_lora_state(unet))
    assert any(v.dim() == 4 for v in states[0].values())  # conv factors are there
    merged, info = merge_adapters(states, [1, 3], merge, rank=4, scalings=[2.0, 2.0])
    assert info["rank"] == 4 and info["lora_alpha"] == 4.0

    adapted = set_lora_state(
        tiny_unet(), merged, info["rank"], info["lora_alpha"], LOCON
    )

    # Reference: the base UNet with ΔW = Σ w_i s_i B_i A_i added to each weight
    # (a conv's ΔW: B [out, r, 1, 1] times A [r, in, k, k], flattened, reshaped).
    reference = tiny_unet()
    prefixes = {k.rsplit(".lora_", 1)[0] for k in merged}
    with torch.no_grad():
        for p in prefixes:
            a, b = f"{p}.lora_A.weight", f"{p}.lora_B.weight"
            delta = sum(
                w * delta_w(st[a].flatten(1), st[b].flatten(1), 2.0)
                for w, st in zip((0.25, 0.75), states, strict=True)
            )
            weight = reference.get_submodule(p).weight
            weight += delta.reshape(weight.shape)
    torch.testing.assert_close(
        probe_output(adapted), probe_output(reference), atol=1e-4, rtol=0
    )


def test_seeded_init_is_the_same_for_every_client():
    # Same seed -> the same A whatever the global RNG did; B = 0; A ~ N(0, 1/r^2).
    first = get_lora_state(attach_lora(tiny_unet(), 4, 4.0, LOCON, seed=5))
    torch.manual_seed(123)
    torch.rand(1000)
    again = get_lora_state(attach_lora(tiny_unet(), 4, 4.0, LOCON, seed=5))
    other = get_lora_state(attach_lora(tiny_unet(), 4, 4.0, LOCON, seed=6))
    a_keys = [k for k in first if ".lora_A." in k]
    assert a_keys and all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in a_keys)
    assert all(not v.any() for k, v in first.items() if ".lora_B." in k)
    a = torch.cat([first[k].flatten() for k in a_keys])
    assert abs(float(a.std()) - 1 / 4) < 0.01 and abs(float(a.mean())) < 0.01


def test_train_lora_keeps_the_adapter_fp32_on_a_half_base():
    # bf16 on CPU stands in for a GPU's fp16: AdamW's steps on a half-precision
    # adapter vanish, so the adapter trains in fp32 while the base stays bf16.
    unet = tiny_unet().to(torch.bfloat16)
    attach_lora(unet, rank=2, alpha=2.0, targets=LOCON, seed=0)
    base = {k: v.clone() for k, v in unet.state_dict().items() if ".lora_" not in k}
    images, cond = tiny_data()
    losses = train_lora(
        unet,
        scheduler(),
        images.bfloat16(),
        cond.bfloat16(),
        steps=5,
        lr=1e-2,
        batch_size=8,
        uncond=torch.zeros(1, 3, 16),
    )
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {p.dtype for p in lora_parameters(unet)} == {torch.float32}
    state = get_lora_state(unet)
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)
    for k, v in unet.state_dict().items():
        if ".lora_" not in k:
            assert v.dtype == torch.bfloat16 and torch.equal(v, base[k]), k
