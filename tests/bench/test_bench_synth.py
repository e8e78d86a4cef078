"""bench synth: the engine against diffusers' own pipeline, and the report maths."""

from __future__ import annotations

import pytest
import torch

from bench.synth.pipeline import compare_pipeline
from bench.synth.quality import summarize_quality
from bench.synth.report import write_report


def test_engine_equals_diffusers_stable_diffusion_pipeline():
    """Same modules, same per-image initial latents, DDIM: the same images."""
    r = compare_pipeline("tiny", 16, 3, 3, 7.5, 1, torch.device("cpu"), torch.float32)
    assert r["max_abs_diff"] <= 1e-5
    assert r["engine_img_s"] > 0 and r["diffusers_img_s"] > 0


def _row(setting, seed, img_s, acc, fid):
    return {
        "setting": setting,
        "seed": seed,
        "img_s": img_s,
        "accuracy": acc,
        "global_accuracy": acc,
        "fid_proxy": fid,
        "images": 10,
    }


def test_quality_summary_by_hand(tmp_path):
    rows = [
        _row("default", 0, 10.0, 0.60, 5.0),
        _row("default", 1, 10.0, 0.70, 6.0),
        _row("fast", 0, 25.0, 0.62, 5.5),
        _row("fast", 1, 30.0, 0.66, 6.0),
        _row("bad", 0, 40.0, 0.40, 9.0),
        _row("bad", 1, 40.0, 0.45, 9.0),
    ]
    s = {q["setting"]: q for q in summarize_quality(rows)}
    assert s["fast"]["speedup"] == pytest.approx((2.5 + 3.0) / 2)
    assert s["fast"]["d_accuracy_per_seed"] == pytest.approx([0.02, -0.04])
    assert s["fast"]["d_fid_proxy"] == pytest.approx(0.25)
    # default's std over seeds: accuracy 0.0707, FID-proxy 0.707
    assert s["fast"]["within_noise"] and not s["bad"]["within_noise"]
    assert s["default"]["speedup"] == pytest.approx(1.0)
    write_report(
        tmp_path, {"machine": "test", "quality": list(s.values()), "notes": []}
    )
    assert "fast" in (tmp_path / "synth.md").read_text()


def test_ablation_summary_and_levelling_off_by_hand(tmp_path):
    from bench.ablation import levels_off, summarize, variants, write_report

    assert "images-per-class=30" in variants() and "guidance-scale=7.5" in variants()

    def row(label, seed, g):
        return {
            "variant": label,
            "seed": seed,
            "global_accuracy": g,
            "accuracy": g,
            "fid_proxy": 1.0,
            "img_s": 5.0,
        }

    rows = [
        row(f"images-per-class={n}", s, g + 0.01 * s)
        for n, g in ((5, 0.50), (10, 0.60), (20, 0.66), (30, 0.70), (50, 0.71))
        for s in (0, 1)
    ]
    summary = summarize(rows)
    ipc = summary["images per class"]
    assert [p["value"] for p in ipc] == [5, 10, 20, 30, 50]
    assert ipc[0]["global_accuracy"] == pytest.approx(0.505)
    lo = levels_off(ipc)
    assert lo["gain_5_to_30"] == pytest.approx(0.20)
    assert lo["gain_30_to_50"] == pytest.approx(0.01) and lo["levels_off"]
    write_report(
        tmp_path,
        {
            "machine": "test",
            "seeds": [0, 1],
            "summary": summary,
            "levels_off": lo,
            "notes": [],
        },
    )
    assert "levels off" in (tmp_path / "ablation.md").read_text()
    assert (tmp_path / "ablation.png").is_file()


@pytest.mark.timeout(300)
def test_variants_replay_the_recorded_uploads_through_the_real_round(
    tiny_stack, fast_config, monkeypatch
):
    """bench.inprocess: the clients' uploads are recorded once; every variant
    is the whole round (deploy.inprocess.run_round) on them, with real client
    evaluations and the FID-proxy of the round's saved synthetic set."""
    from bench.inprocess import federation, run_variant
    from methods.oscar import client_oscar

    fed = federation(fast_config | {"seed": 0}, 2)
    assert len(fed.replies) == 2 and fed.info["collect_type"] == "train.embed"
    assert fed.vector_bytes_per_class() > 0

    def no_second_upload(job):
        raise AssertionError("a variant asked a client to compute its upload again")

    monkeypatch.setattr(client_oscar, "collect", no_second_upload)
    rows = [
        run_variant(fed, {}, "default"),
        run_variant(fed, {"num-inference-steps": 1}, "one-step"),
    ]
    for row in rows:
        assert row["seed"] == 0 and row["images"] > 0 and row["img_s"] > 0
        assert 0.0 <= row["accuracy"] <= 1.0  # the clients' own evaluations
        assert 0.0 <= row["global_accuracy"] <= 1.0
        assert row["fid_proxy"] >= 0.0
    assert rows[0]["images"] == rows[1]["images"]
    assert [r["variant"] for r in rows] == ["default", "one-step"]


def test_cpu_batch_part_times_every_size_on_the_same_images(tmp_path):
    """bench synth --parts cpu-batch: one row per size, the first the reference,
    the same images at every size; the report names them and the notes of the
    parts not run stay."""
    from bench.synth.cli import main
    from bench.synth.cpu_batch import compare_cpu_batches

    rows = compare_cpu_batches([8, 3], n=8, reps=1)
    assert [r["batch"] for r in rows] == [8, 3] and rows[0]["ratio"] == 1.0
    assert all(r["max_abs_diff"] < 1e-4 and r["img_s"] > 0 for r in rows)
    # through the command, onto a report that has another part's numbers and note
    write_report(
        tmp_path,
        {"machine": "m", "notes": {"quality": ["kept note"]}, "workers": []},
    )
    assert (
        main(
            [
                "--parts",
                "cpu-batch",
                "--batches",
                "4,2",
                "--images",
                "4",
                "--reps",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    md = (tmp_path / "synth.md").read_text()
    assert "CPU denoising batch" in md and "kept note" in md
    assert "| 2 |" in md and "last run: parts cpu-batch" in md
