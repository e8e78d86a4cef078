"""Foundation weights load from safetensors only (``common.weights.load_pretrained``
asks every model class for ``use_safetensors=True``): a pickled ``.bin``
checkpoint is refused with the fix; ``save_pretrained``'s default is loaded."""

from __future__ import annotations

import pytest
import torch

from common.weights import load_pretrained, loads_weights


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=8,
    )


def _tiny_text_model():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=50,
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=8,
    )
    return CLIPTextModel(cfg)


def test_model_classes_ask_for_safetensors_and_configs_do_not():
    from diffusers import DDPMScheduler, UNet2DModel
    from transformers import AutoConfig, AutoModelForImageTextToText, CLIPModel

    assert loads_weights(UNet2DModel) and loads_weights(CLIPModel)
    assert loads_weights(AutoModelForImageTextToText)
    assert not loads_weights(AutoConfig) and not loads_weights(DDPMScheduler)


@pytest.mark.parametrize(
    "make,pickle_name",
    [
        (_tiny_unet, "diffusion_pytorch_model.bin"),
        (_tiny_text_model, "pytorch_model.bin"),
    ],
)
def test_save_pretrained_default_loads_and_a_pickle_is_refused(
    make, pickle_name, tmp_path
):
    model = make()
    model.save_pretrained(tmp_path / "safe")  # the default: safetensors
    back = load_pretrained(type(model), str(tmp_path / "safe"), "generator")
    for (k, a), (_, b) in zip(
        model.state_dict().items(), back.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    # the same checkpoint as a pickle only (transformers 5 no longer writes one)
    model.save_pretrained(tmp_path / "pickle")
    for f in (tmp_path / "pickle").glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), tmp_path / "pickle" / pickle_name)
    with pytest.raises(FileNotFoundError, match="generator="):
        load_pretrained(type(model), str(tmp_path / "pickle"), "generator")
