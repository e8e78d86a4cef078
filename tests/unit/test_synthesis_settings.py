"""One settings object for the sampler (issue 24): run-config keys become sampler
settings in ``SynthesisSettings.from_config`` and nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from common.synthesis_settings import SAMPLER_KEYS, SynthesisSettings

ROOT = Path(__file__).resolve().parents[2]
ENGINE = {"common/synthesis.py", "common/synthesis_settings.py"}
ENTRY_POINTS = {"sample", "synthesize", "sample_on_workers", "engine_sample"}
CONFIG_FIELDS = {
    "guidance_scale",
    "num_inference_steps",
    "guidance_cutoff",
    "synth_batch_size",
}


def _sources() -> list[Path]:
    skip = ("tests/", ".git/", "outputs/", "bench-results/")
    return sorted(
        p
        for p in ROOT.rglob("*.py")
        if not str(p.relative_to(ROOT)).startswith(skip)
        and str(p.relative_to(ROOT)) not in ENGINE
    )


def _name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


def test_no_caller_passes_sampler_keys_by_hand():
    """A call of the engine names no sampler key (they come as
    ``**settings.kwargs()``), and no code reads a sampler key off the run config."""
    bad = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) in ENTRY_POINTS:
                named = [k.arg for k in node.keywords if k.arg in SAMPLER_KEYS]
                if named:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {named}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in CONFIG_FIELDS
                and isinstance(node.value, ast.Name | ast.Attribute)
                and _name(node.value) in ("cfg", "config", "run_config")
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} cfg.{node.attr}")
    assert not bad, "build sampler settings with SynthesisSettings:\n" + "\n".join(bad)


def test_the_guard_sees_a_hand_built_call(tmp_path):
    """The scan above is not vacuous: it flags the pattern it exists for."""
    tree = ast.parse("sample(gen, c, u, guidance_scale=cfg.guidance_scale)")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert [k.arg for k in calls[0].keywords] == ["guidance_scale"]
    assert _name(calls[0].func) in ENTRY_POINTS


def test_from_config_reads_every_run_key_and_overrides_win(fast_config):
    from methods import build_config

    cfg = build_config(
        fast_config
        | {"guidance-cutoff": 0.4, "compile": True, "synth-batch-size": 7, "seed": 3}
    )
    s = SynthesisSettings.from_config(cfg)
    assert s == SynthesisSettings(
        guidance_scale=cfg.guidance_scale,
        num_inference_steps=cfg.num_inference_steps,
        guidance_cutoff=0.4,
        seed=3,
        batch_size=7,
        static_shapes=True,
    )
    assert SynthesisSettings.from_config(cfg, guidance_scale=1.0).guidance_scale == 1.0
    assert set(s.kwargs()) == set(SAMPLER_KEYS)
    with pytest.raises(TypeError, match="guidance_cut"):
        s.replace(guidance_cut=0.3)


def test_lora_client_samples_with_the_runs_guidance_cutoff(
    monkeypatch, tiny_stack, fast_config
):
    """The LoRA client's FID-proxy samples used cut-off 1.0 while the run used 0.5
    (issue 24's live bug): its settings now come from the run config."""
    from types import SimpleNamespace

    import torch

    import methods.lora.client_lora as client_lora
    from methods import build_config

    class Sampled(Exception):
        pass

    seen: dict = {}

    def fake_sample(gen, cond, uncond, **kw):
        seen.update(kw)
        raise Sampled

    monkeypatch.setattr("common.synthesis.sample", fake_sample)
    cfg = build_config(fast_config | {"guidance-cutoff": 0.3, "method": "lora"})
    emb = SimpleNamespace(means=torch.zeros(2, 1, 16))
    with pytest.raises(Sampled):
        client_lora.fid_proxy_of_adapter(cfg, None, emb, {}, 4, 4.0, seed=5)  # type: ignore[arg-type]
    assert seen["guidance_cutoff"] == 0.3 and seen["seed"] == 5
    assert seen["num_inference_steps"] == cfg.num_inference_steps
