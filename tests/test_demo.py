"""pogdiff/pretrain.py (base-model pretraining) and examples/demo_digits.py (the offline end-to-end demo).

The unit tests run on a handful of 32 px images in seconds; the end-to-end test runs the demo's `--quick` preset
through the real `accelerate launch` / `evaluate_pogdiff.py` subprocesses (minutes, marked e2e).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pogdiff.pretrain import (
    batch_indices,
    build_base_model,
    encode_posteriors,
    images_to_tensor,
    latent_scaling_factor,
    pretrain_unet,
    pretrain_vae,
    reconstruction_error,
)
from pogdiff.pretrain import (
    main as pretrain_main,
)
from pogdiff.testing import tiny_sd_components

REPO = Path(__file__).resolve().parent.parent


def load_demo():
    if "demo_digits" not in sys.modules:
        spec = importlib.util.spec_from_file_location("demo_digits", REPO / "examples" / "demo_digits.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["demo_digits"] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules["demo_digits"]


def blob_images(n: int, seed: int = 0) -> list[Image.Image]:
    """n 32 px images of a bright square on black at varying places: something a VAE can learn fast."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        top, left = rng.integers(0, 20, 2)
        pixels[top : top + 12, left : left + 12] = 230
        images.append(Image.fromarray(pixels))
    return images


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and on a busy machine two threads stall
    each other (measured here: the VAE test took 228 s with two threads under load, 18 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_pixels() -> torch.Tensor:
    return images_to_tensor(blob_images(8))


# ---- pogdiff/pretrain.py ----------------------------------------------------------------------------------------


def test_batch_indices_walk_through_whole_permutations():
    batches = list(batch_indices(4, 3, 4, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [3, 3, 3, 3]
    flat = torch.cat(batches).tolist()
    # 12 indices = 3 epochs; every epoch is a permutation of range(4), batches straddle epoch boundaries.
    assert [sorted(flat[i : i + 4]) for i in (0, 4, 8)] == [[0, 1, 2, 3]] * 3
    again = torch.cat(list(batch_indices(4, 3, 4, torch.Generator().manual_seed(0)))).tolist()
    assert flat == again
    # A batch larger than the data is capped at the data size.
    assert [len(b) for b in batch_indices(2, 5, 2, torch.Generator().manual_seed(0))] == [2, 2]


def test_latent_scaling_factor_is_one_over_sample_std():
    # Zero posterior std: the samples are the means -2 and 2, whose (unbiased) std is sqrt(8).
    mean = torch.tensor([[-2.0, 2.0]])
    assert latent_scaling_factor(mean, torch.zeros_like(mean)) == pytest.approx(1 / math.sqrt(8), rel=1e-12)
    with pytest.raises(ValueError, match="did not train"):
        latent_scaling_factor(torch.ones(1, 4), torch.zeros(1, 4))


def test_pretrain_vae_lowers_reconstruction_error_deterministically(tiny_pixels):
    def run(seed: int, steps: int):
        vae = tiny_sd_components(seed=0)["vae"]
        history = pretrain_vae(
            vae, tiny_pixels, steps=steps, batch_size=4, lr=2e-3, seed=seed, show_progress=False
        )
        return vae, history

    vae = tiny_sd_components(seed=0)["vae"]
    before = reconstruction_error(vae, tiny_pixels)
    history = pretrain_vae(vae, tiny_pixels, steps=12, batch_size=4, lr=2e-3, seed=0, show_progress=False)
    assert reconstruction_error(vae, tiny_pixels) < 0.5 * before  # 12 steps halve the error on these images
    assert len(history) == 12 and history[-1] < history[0]
    # Same seed: same batches, posterior draws and weights, bit for bit; another seed differs.
    vae_a, history_a = run(seed=0, steps=3)
    vae_b, history_b = run(seed=0, steps=3)
    assert history_a == history_b
    assert all(torch.equal(p, q) for p, q in zip(vae_a.parameters(), vae_b.parameters()))
    assert run(seed=1, steps=3)[1] != history_a


def test_pretrain_unet_regresses_v_and_is_deterministic():
    components = tiny_sd_components(seed=0)
    scheduler = components["scheduler"]
    scheduler.register_to_config(prediction_type="v_prediction")
    mean = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    std = torch.full_like(mean, 0.1)
    states = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    empty = torch.zeros(1, 77, 32)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])

    def run():
        unet = tiny_sd_components(seed=0)["unet"]
        history = pretrain_unet(
            unet, scheduler, mean, std, states, ids, scaling_factor=0.5, empty_state=empty, steps=3,
            batch_size=4, lr=1e-3, caption_dropout_prob=0.5, seed=0, show_progress=False,
        )  # fmt: skip
        return unet, history

    unet_a, history_a = run()
    unet_b, history_b = run()
    assert history_a == history_b and all(math.isfinite(v) for v in history_a)
    assert all(torch.equal(p, q) for p, q in zip(unet_a.parameters(), unet_b.parameters()))
    # The first step's loss is the MSE against the velocity, recomputed here from the same draws.
    generator = torch.Generator().manual_seed(0)
    rows = next(batch_indices(6, 4, 1, generator))
    latents = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator)) * 0.5
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (4,), generator=generator)
    dropped = torch.rand(4, generator=generator) < 0.5
    cond = torch.where(dropped[:, None, None], empty.expand(4, 77, 32), states[ids[rows]])
    fresh = tiny_sd_components(seed=0)["unet"]
    with torch.no_grad():
        pred = fresh(scheduler.add_noise(latents, noise, timesteps), timesteps, cond).sample
    expected = torch.mean((pred - scheduler.get_velocity(latents, noise, timesteps)) ** 2).item()
    assert history_a[0] == pytest.approx(expected, rel=1e-5)


def test_build_base_model_cli_saves_a_loadable_v_prediction_pipeline(tiny_dataset_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "base"
    summary = pretrain_main(
        ["--train_data_dir", tiny_dataset_path, "--output_dir", str(out), "--vae_steps", "3", "--unet_steps", "2",
         "--batch_size", "4", "--seed", "0"]
    )  # fmt: skip
    assert summary["num_images"] == 16
    assert summary["captions"] == {
        "An image of alice.": 6, "An image of bruno.": 6, "An image of chen.": 2, "An image of dara.": 2,
    }  # fmt: skip
    assert json.loads((out / "pretraining.json").read_text()) == summary

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # The saved scaling factor is 1 / std of posterior samples of the training images under the saved VAE.
    from pogdiff.pretrain import load_training_images

    images, _ = load_training_images(tiny_dataset_path)
    mean, std = encode_posteriors(pipe.vae, images_to_tensor(images))
    expected = latent_scaling_factor(mean, std, seed=0)
    assert pipe.vae.config.scaling_factor == pytest.approx(expected, rel=1e-5)
    assert summary["scaling_factor"] == pytest.approx(expected, rel=1e-5)
    image = pipe("An image of chen.", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_build_base_model_trains_the_text_encoder_only_when_asked(tmp_path):
    from transformers import CLIPTextModel

    def build(name, **kwargs):
        summary = build_base_model(
            tmp_path / name, images=blob_images(4), captions=["An image of ada.", "An image of ada, thin.",
            "An image of bo.", "An image of bo, thick."], vae_steps=1, unet_steps=3, batch_size=4, seed=0,
            show_progress=False, **kwargs,
        )  # fmt: skip
        encoder = CLIPTextModel.from_pretrained(tmp_path / name / "text_encoder")
        return summary, {k: v.clone() for k, v in encoder.state_dict().items()}

    frozen, frozen_weights = build("frozen")
    trained, trained_weights = build("trained", train_text_encoder=True)
    assert frozen["unet"]["text_encoder"] == "frozen at random initialisation"
    assert trained["unet"]["text_encoder"] == "trained with the UNet"
    # Both start from the same random encoder (seed 0); only the trained one moved.
    changed = [k for k in frozen_weights if not torch.equal(frozen_weights[k], trained_weights[k])]
    assert any("self_attn.q_proj.weight" in k for k in changed)
    assert any("final_layer_norm" in k for k in changed)


def test_pretrain_unet_with_a_trained_text_encoder_starts_from_the_same_loss(tmp_path):
    from pogdiff.families import SDTextEncoders
    from pogdiff.pretrain import encode_prompts, pretrain_unet
    from pogdiff.testing import tiny_sd_components

    captions = ["An image of ada.", "An image of bo."]

    def first_loss(trained: bool) -> float:
        parts = tiny_sd_components(seed=0, tokenizer_dir=str(tmp_path / f"tok{trained}"))
        encoder, tokenizer = parts["text_encoder"], parts["tokenizer"]
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        ids = SDTextEncoders([tokenizer], [encoder]).tokenize(captions)
        extra = {}
        if trained:
            extra = {"text_encoder": encoder, "caption_input_ids": ids,
                     "empty_input_ids": SDTextEncoders([tokenizer], [encoder]).tokenize([""])}  # fmt: skip
        history = pretrain_unet(
            parts["unet"], parts["scheduler"], latents, torch.zeros_like(latents),
            encode_prompts(encoder, tokenizer, captions), torch.tensor([0, 1]), scaling_factor=1.0,
            empty_state=encode_prompts(encoder, tokenizer, [""]), steps=1, batch_size=2, seed=0,
            show_progress=False, **extra,
        )  # fmt: skip
        if trained:  # handed back frozen, in eval mode, as fine-tuning expects it
            assert encoder.training is False and not any(p.requires_grad for p in encoder.parameters())
        return history[0]

    assert first_loss(True) == pytest.approx(first_loss(False), rel=1e-5)


def test_build_base_model_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="one caption per image"):
        build_base_model(tmp_path, images=blob_images(2), captions=["a"], vae_steps=0, unet_steps=0)
    with pytest.raises(ValueError, match="prediction_type"):
        build_base_model(tmp_path, images=blob_images(1), captions=["a"], prediction_type="sample")


# ---- examples/demo_digits.py: pure helpers ---------------------------------------------------------------------


def test_digit_image_and_judge_features_round_trip():
    demo = load_demo()
    full = np.full((8, 8), 16.0)
    image = demo.digit_image(full)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert np.asarray(image).min() == 255
    assert np.array_equal(demo.judge_features(image), np.full(64, 16.0))
    # A left half of ink: the judge sees 16 on the left four columns and 0 on the right four.
    half = np.zeros((32, 32), dtype=np.uint8)
    half[:, :16] = 255
    features = demo.judge_features(Image.fromarray(half).convert("RGB")).reshape(8, 8)
    assert np.array_equal(features[:, :4], np.full((8, 4), 16.0)) and not features[:, 4:].any()


def test_shot_means_and_verdict_numbers():
    demo = load_demo()
    means = demo.shot_means({5: 1.0, 6: 0.5, 7: 0.25, 8: 0.0, 9: 0.5}, few=[7, 8, 9])
    assert means == {"all": pytest.approx(0.45), "few": pytest.approx(0.25), "many": pytest.approx(0.75)}
    # 0.6 vs 0.4 over 60 images: SE = sqrt((0.24 + 0.24) / 60) = 0.0894, so 2 SE = 0.179 < 0.2: a lead.
    ahead = demo.verdict({"pogdiff": {"few": 0.6}, "vanilla": {"few": 0.4}}, 60)
    assert ahead["two_standard_errors"] == pytest.approx(2 * math.sqrt(0.48 / 60))
    assert ahead["text"].startswith("PoGDiff is ahead")
    assert demo.verdict({"pogdiff": {"few": 0.5}, "vanilla": {"few": 0.4}}, 60)["text"].startswith("No clear")
    assert "does NOT beat" in demo.verdict({"pogdiff": {"few": 0.1}, "vanilla": {"few": 0.6}}, 60)["text"]


def test_pretraining_names_skip_fine_tuning_pseudonyms():
    demo = load_demo()
    from pogdiff.longtail import PSEUDONYM_FIRST_NAMES

    first = list(PSEUDONYM_FIRST_NAMES[:6])
    assert demo.pretraining_names({first[1], first[3]}, 4) == [first[0], first[2], first[4], first[5]]


# ---- examples/demo_digits.py --quick, end to end -----------------------------------------------------------------


def table_rows(markdown: str, header_start: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header starts with `header_start`: first cell -> other cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.e2e
@pytest.mark.long(seconds=490)
def test_quick_demo_end_to_end(quick_demo_run):
    # One --quick run per session (tests/conftest.py), shared with tests/test_notebook.py.
    out, proc = quick_demo_run.output_dir, quick_demo_run.process
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert "| Method | Acc All | Acc Few | Acc Many |" in proc.stdout  # the table is printed

    # Both methods, the long-tailed shape and an honest judge.
    assert set(results["methods"]) == {"vanilla", "pogdiff"}
    assert sorted(c["n_train"] for c in results["classes"].values()) == [2, 2, 2, 30, 30]
    assert len(results["few_shot_classes"]) == 3
    assert results["judge"]["cv_accuracy_5fold"] > 0.95  # the SVM recognises held-out real digits
    assert results["base_model"]["unet"]["prediction_type"] == "v_prediction"
    assert results["seed"] == 0

    # Accuracies are shares in [0, 1], All is the mean of the per-class ones, and results.md shows the same numbers.
    accuracy_rows = table_rows(markdown, "| Method | Acc All")
    metric_rows = table_rows(markdown, "| Method | DINO")
    for method, result in results["methods"].items():
        per_class = list(result["per_class"].values())
        values = [result["accuracy"][g] for g in ("all", "few", "many")] + per_class
        assert all(0.0 <= v <= 1.0 for v in values)
        assert result["accuracy"]["all"] == pytest.approx(np.mean(per_class))
        assert accuracy_rows[method] == [f"{v:.3f}" for v in values]
        shown = [
            "n/a" if result["metrics"][m][g] is None else f"{result['metrics'][m][g]:.3f}"
            for m in ("dino", "grecall", "fid")
            for g in ("all", "few")
        ]
        assert metric_rows[method] == shown
    assert results["verdict"]["text"] in markdown
    assert re.search(r"Quick mode", markdown)

    # Grids: the demo's own and evaluate_pogdiff.py's, real images with content.
    grids = [
        out / "grid_samples.png",
        out / "eval" / "grid_few_shot.png",
        *sorted((out / "eval" / "grids").glob("*.png")),
    ]
    assert len(grids) == 2 + 5
    for path in grids:
        pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
        assert min(pixels.shape) >= 100 and pixels.std() > 10, path


@pytest.mark.e2e
def test_quick_demo_gives_the_same_table_when_run_again(quick_demo_runs, quick_demo_dir):
    """The demo again from scratch (data, base model, fine-tunes, evaluation) in another folder, side by side with
    the first run (tests/conftest.py): same seed, same machine, same numbers and the same table (README: the
    numbers may depend on the CPU, not on the run)."""
    again = quick_demo_runs[1]
    assert again is not None  # started by the fixture whenever this test is selected
    out, proc = again.output_dir, again.process
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = json.loads((quick_demo_dir / "results.json").read_text())
    second = json.loads((out / "results.json").read_text())
    for key in ("methods", "verdict", "judge", "classes", "few_shot_classes"):
        assert second[key] == first[key], key
    assert {k: v for k, v in second["base_model"].items() if k != "wall_time_s"} == {
        k: v for k, v in first["base_model"].items() if k != "wall_time_s"
    }

    def tables(markdown: str) -> list[list[str]]:
        """The results tables (header "| Method ..."); the timings table differs from run to run."""
        blocks, block = [], []
        for line in [*markdown.splitlines(), ""]:
            if line.startswith("|"):
                block.append(line)
            elif block:
                blocks.append(block)
                block = []
        return [b for b in blocks if b[0].startswith("| Method")]

    shown = tables((out / "results.md").read_text())
    assert len(shown) >= 2 and shown == tables((quick_demo_dir / "results.md").read_text())
