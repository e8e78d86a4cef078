"""``global_model/``: what a user takes home from a run, loaded by users' tools.

A classifier round's folder loads with ``common.models.load_classifier`` and
scores the reported global accuracy on the same global test set; ``classify``
names PNG files. A LoRA round's adapter loads with diffusers'
``load_lora_weights`` into a ``StableDiffusionPipeline`` and samples what this
project's engine samples with the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.datasets import dataset_info, global_test_set
from common.models import (
    SmallCNN,
    build_classifier,
    classify,
    load_classifier,
    save_classifier,
)
from common.train import predict
from methods import build_config
from methods.base import ServerContext, ServerOutput
from methods.lora import payload_lora
from server_app import persist
from server_app.artifacts import (
    CLASSIFIER,
    GLOBAL_MODEL,
    record_global_accuracy,
    save_global_model,
)


def _ctx(rc: dict, run_dir: Path) -> ServerContext:
    cfg = build_config(rc)
    return ServerContext(cfg, run_dir, info=dataset_info(cfg.data_args()))


def _no_leftovers(run_dir: Path) -> bool:
    return not list(run_dir.glob(".global_model.*"))


# ---------------------------------------------------------------- classifier round


def test_a_classifier_round_global_model_scores_the_reported_accuracy(
    tiny_stack, fast_config, tmp_path
):
    from deploy.inprocess import partition_fleet, run_round

    rc = fast_config | {
        "method": "fedavg",
        "collect-quiet-s": 0.0,
        "collect-window-s": 30.0,
    }
    res, _ = run_round(partition_fleet(3), rc)
    run_dir = Path(rc["output-dir"]) / "inprocess"
    assert res["global_accuracy"] is not None

    # 1. Export the persisted server output (as the round's hook does)
    out = persist.load_output(run_dir)
    assert out is not None and out.model_state is not None
    path = save_global_model(run_dir, out, _ctx(rc, run_dir), "fedavg")
    assert path == run_dir / GLOBAL_MODEL
    assert record_global_accuracy(run_dir, res["global_accuracy"]) == (
        path / "config.json"
    )
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["arch"] == res["config"]["classifier"]
    assert (cfg["in_channels"], cfg["num_classes"]) == (1, 10)
    assert cfg["class_names"] == res["class_names"]
    assert cfg["image_size"] == rc["image-size"]
    assert cfg["normalization"]["range"] == [-1.0, 1.0]
    assert cfg["normalization"]["pil_mode"] == "L"
    assert (cfg["method"], cfg["dataset"]) == ("fedavg", rc["dataset"])
    assert cfg["global_accuracy"] == res["global_accuracy"]

    # 2. The documented loader gives the reported accuracy on the same test set
    model = load_classifier(path)
    domains = tuple(res["global_test"]["domains"])
    cfg = build_config(rc)
    test = global_test_set(cfg.data_args(), domains, cfg.global_test_per_class)
    assert test is not None and len(test) == res["global_test_size"]
    acc, per_domain = test.score(predict(model, test.images))
    assert abs(acc - res["global_accuracy"]) <= 1e-6
    for d, a in res["global_accuracy_per_domain"].items():
        assert abs(per_domain[d] - a) <= 1e-6

    # 3. classify: PNG files (and PIL images) -> class names, through the
    # clients' pipeline: a PNG at image-size is the uint8 image exactly
    pixels = ((test.images[::97][:6] + 1) * 127.5).round().to(torch.uint8)
    files = []
    for i, p in enumerate(pixels):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(p[0].numpy(), mode="L").save(files[-1])
    names = classify(path, files)
    assert len(names) == 6 and set(names) <= set(res["class_names"])
    expected = predict(model, pixels.float() / 127.5 - 1)
    assert names == [res["class_names"][int(k)] for k in expected]
    assert classify(path, [Image.open(f) for f in files]) == names

    # 4. Idempotent: the same output gives the same files, nothing left behind
    before = (path / "model.safetensors").read_bytes()
    assert save_global_model(run_dir, out, _ctx(rc, run_dir), "fedavg") == path
    assert (path / "model.safetensors").read_bytes() == before
    assert _no_leftovers(run_dir)


def test_no_global_model_and_a_state_that_does_not_fit(fast_config, tmp_path):
    ctx = _ctx(fast_config, tmp_path)
    assert save_global_model(tmp_path, ServerOutput(), ctx, "local") is None
    assert record_global_accuracy(tmp_path, 0.5) is None
    bad = ServerOutput(model_state={"head.weight": torch.zeros(3, 3)}, arch="cnn")
    assert save_global_model(tmp_path, bad, ctx, "fedavg") is None  # logged
    assert not (tmp_path / GLOBAL_MODEL).exists() and _no_leftovers(tmp_path)


def test_an_old_classifier_folder_still_loads_but_cannot_classify(tmp_path):
    model = SmallCNN(1, 10, width=8)
    save_classifier(model, tmp_path, "cnn", 1, 10)  # the judge's call, unchanged
    x = torch.zeros(2, 1, 16, 16)
    assert torch.equal(load_classifier(tmp_path)(x), model.eval()(x))
    with pytest.raises(ValueError, match="class_names.*image_size"):
        classify(tmp_path, [Image.new("L", (16, 16))])
    with pytest.raises(ValueError, match="one name per class"):
        save_classifier(model, tmp_path, "cnn", 1, 10, class_names=["a"])


# ---------------------------------------------------------------- LoRA round


def _run_pipe(pipe, cond, uncond, latents, steps, guidance):
    n = len(cond)
    return pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond.expand(n, -1, -1),
        latents=latents.clone(),
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="pt",
    ).images.float()


def test_a_lora_global_model_loads_into_a_diffusers_pipeline(fast_config, tmp_path):
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from tiny_stack import make_tiny_sd

    from common.generator import load_generator
    from common.lora import (
        LORA_WEIGHTS,
        attach_lora,
        get_lora_state,
        load_diffusers_lora,
        set_lora_state,
    )
    from common.synthesis import image_generators, sample

    # 1. A merged adapter of the tiny SD-format UNet, alpha / rank = 1.5
    sd = make_tiny_sd(tmp_path / "sd")
    gen = load_generator(str(sd), scheduler="ddim")
    targets, rank, alpha = ["to_q", "to_v", "conv1"], 3, 4.5
    attach_lora(gen.unet, rank, alpha, targets, seed=0)
    g = torch.Generator().manual_seed(1)
    state = {
        k: 0.3 * torch.randn(v.shape, generator=g)
        for k, v in get_lora_state(gen.unet).items()
    }
    gen.unet.unload_lora()

    # 2. The LoRA round's output, exported
    run_dir = tmp_path / "run"
    ctx = _ctx(
        fast_config
        | {
            "method": "lora",
            "generator": str(sd),
            "text-encoder": str(sd),
            "embedding": "sequence",
            "lora-targets": ",".join(targets),
        },
        run_dir,
    )
    ctx.generator = gen  # what the round loaded (its fingerprint is recorded)
    out = ServerOutput(
        model_state=build_classifier("cnn", 1, 10).state_dict(),
        arch="cnn",
        push_arrays={payload_lora.RECORD: payload_lora.layout(state, None)},
        push_config={"lora-rank": rank, "lora-alpha": alpha},
    )
    path = save_global_model(run_dir, out, ctx, "lora", global_accuracy=0.25)
    assert path == run_dir / GLOBAL_MODEL
    assert {p.name for p in path.iterdir()} == {
        "config.json",
        "pytorch_lora_weights.safetensors",
        CLASSIFIER,
    }
    about = json.loads((path / "config.json").read_text())
    assert (about["rank"], about["lora_alpha"], about["scale"]) == (3, 4.5, 1.5)
    assert about["base_model"] == str(sd)
    assert about["base_model_fingerprint"] == gen.fingerprint()
    assert about["classifier"] == CLASSIFIER
    assert load_classifier(path / CLASSIFIER).head.out_features == 10
    assert (
        json.loads((path / CLASSIFIER / "config.json").read_text())["global_accuracy"]
        == 0.25
    )
    with pytest.raises(ValueError, match="classifier"):
        load_classifier(path)

    # 3. A StableDiffusionPipeline of the same modules, without and with it; one
    # scheduler object for both, with the settings SD pipelines expect (a
    # pipeline rewrites other steps_offset / clip_sample values, with a warning)
    gen.scheduler = DDIMScheduler.from_config(
        gen.scheduler.config, steps_offset=1, clip_sample=False
    )
    pipe = StableDiffusionPipeline(
        vae=gen.vae,
        text_encoder=None,
        tokenizer=None,
        unet=UNet2DConditionModel.from_pretrained(
            sd / "unet", use_safetensors=True
        ).eval(),
        scheduler=gen.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    n, steps, guidance = 3, 4, 3.0
    cond = torch.randn(n, 16, 32, generator=g)
    uncond = torch.randn(1, 16, 32, generator=g)
    # the engine's x_T of images 0..n-1 (seed 0), handed to the pipeline
    latents = torch.stack(
        [
            torch.randn(gen.sample_shape, generator=x)
            for x in image_generators(0, range(n))
        ]
    )
    base = _run_pipe(pipe, cond, uncond, latents, steps, guidance)
    pipe.load_lora_weights(str(path))
    adapted = _run_pipe(pipe, cond, uncond, latents, steps, guidance)
    # the bare-UNet route that config.json's "load" names
    bare = UNet2DConditionModel.from_pretrained(
        sd / "unet", use_safetensors=True
    ).eval()
    bare.load_lora_adapter(str(path), weight_name=LORA_WEIGHTS, prefix="unet")
    t = torch.tensor(10)
    with torch.no_grad():
        torch.testing.assert_close(
            bare(latents, t, encoder_hidden_states=cond).sample,
            pipe.unet(latents, t, encoder_hidden_states=cond).sample,
            atol=1e-6,
            rtol=0,
        )

    # 4. The project's sampler with the adapter (set_lora_state) samples the same
    def ours(st, r, a, t):
        set_lora_state(gen.unet, st, r, a, t)
        x = sample(
            gen,
            cond,
            uncond,
            guidance_scale=guidance,
            num_inference_steps=steps,
            seed=0,
            batch_size=n,
        )
        gen.unet.unload_lora()
        return (x + 1) / 2

    torch.testing.assert_close(
        ours(state, rank, alpha, targets), adapted, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        ours(*load_diffusers_lora(path)), adapted, atol=1e-5, rtol=0
    )
    # ... and the test can fail: the adapter changes the images, and its scale
    # alpha / rank matters
    assert float((adapted - base).abs().max()) > 1e-3
    assert float((ours(state, rank, float(rank), targets) - adapted).abs().max()) > 1e-3
