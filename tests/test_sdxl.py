"""Stable Diffusion XL through the same trainer, objective, pipeline, evaluation and LoRA outputs (tiny SDXL).

The family differences live in `pogdiff/families.py`; these tests check what SDXL adds: two text encoders and the
pooled `text_embeds`, the per-image `time_ids` (original size, crop, target size), PoGDiff's neighbour forward
that swaps the caption but keeps the image's own time ids, and every loading route of an SDXL result.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pogdiff.families import (
    SD,
    SDXL,
    Conditioning,
    cat_conditioning,
    detect_family,
    neighbor_conditioning,
    unet_prediction,
)
from pogdiff.testing import run_process_group
from tests.test_train import assert_same_tensors, run_in_process, train_args, unet_state

REPO = Path(__file__).resolve().parent.parent


def accelerate_launch(argv: list[str]):
    """`accelerate launch train_pogdiff.py ...` on one CPU process, offline; fails the test with its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_process_group(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
         str(REPO / "train_pogdiff.py"), *argv],
        cwd=REPO, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def sample(pipe, prompt: str = "An image of chen.") -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images


# ----------------------------------------------------------------------------------------------------------------
# Units: family detection, conditioning, time ids
# ----------------------------------------------------------------------------------------------------------------


def test_family_is_read_from_model_index(tiny_sd_path, tiny_sdxl_path):
    assert detect_family(tiny_sd_path) is SD
    assert detect_family(tiny_sdxl_path) is SDXL
    assert SDXL.model_parts == (
        "scheduler", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae", "unet"
    )  # fmt: skip


def test_time_ids_of_a_cropped_and_flipped_image_match_hand_computed_values():
    """A 40 x 64 (h x w) image at resolution 32: resized to 32 x 51, a random crop at (top 0, left L), then a flip.
    diffusers' SDXL script flips first and records the crop in the flipped image: left' = 51 - 32 - L."""
    from pogdiff.data import preprocess_image_and_crop

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))
    flipped_once = None
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        pixels, original, (top, left) = preprocess_image_and_crop(
            image, 32, random_flip=True, generator=generator
        )
        # Replay the generator's draws by hand: crop row, crop column, then the flip.
        replay = torch.Generator().manual_seed(seed)
        drawn_top = int(torch.randint(0, 32 - 32 + 1, (1,), generator=replay).item())
        drawn_left = int(torch.randint(0, 51 - 32 + 1, (1,), generator=replay).item())
        flipped = torch.rand(1, generator=replay).item() < 0.5
        assert original == (40, 64)
        assert top == drawn_top == 0
        assert left == (51 - 32 - drawn_left if flipped else drawn_left)
        # The recorded crop is where the pixels really come from in the (flipped) resized image.
        resized = image.resize((51, 32), Image.BILINEAR)
        if flipped:
            resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
            flipped_once = True
        expected = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 127.5 - 1
        assert np.allclose(pixels.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert flipped_once

    from pogdiff.families import add_time_ids

    assert add_time_ids((40, 64), (0, 7), (32, 32)).tolist() == [40, 64, 0, 7, 32, 32]


def test_neighbour_conditioning_swaps_the_caption_and_keeps_the_time_ids():
    own = Conditioning(torch.zeros(3, 4, 8), torch.zeros(3, 5), torch.arange(18.0).view(3, 6))
    neighbours = Conditioning(torch.ones(2, 4, 8), torch.ones(2, 5))
    rows = torch.tensor([0, 2])
    cond = neighbor_conditioning(own, neighbours, rows)
    assert torch.equal(cond.hidden_states, neighbours.hidden_states)
    assert torch.equal(cond.text_embeds, neighbours.text_embeds)
    assert torch.equal(cond.time_ids, own.time_ids[rows])
    both = cat_conditioning(
        [own, neighbor_conditioning(own, Conditioning(torch.ones(3, 4, 8), torch.ones(3, 5)))]
    )
    assert both.hidden_states.shape == (6, 4, 8) and torch.equal(both.time_ids[3:], own.time_ids)
    # SD: a plain tensor of hidden states is the whole conditioning.
    assert neighbor_conditioning(torch.zeros(3, 4, 8), torch.ones(2, 4, 8), rows).shape == (2, 4, 8)


def test_text_encoders_give_the_pipelines_conditioning(tiny_sdxl_path):
    """The trainer's SDXL conditioning is what StableDiffusionXLPipeline.encode_prompt computes."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    encoders = SDXL.text_encoders_of(pipe)
    prompts = ["An image of chen.", "An image of alice."]
    cond = encoders.encode(encoders.tokenize(prompts))
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert cond.hidden_states.shape == (2, 77, 64)
    assert torch.equal(cond.hidden_states, embeds) and torch.equal(cond.text_embeds, pooled)
    # The UNet runs on it with time ids.
    cond = Conditioning(cond.hidden_states, cond.text_embeds, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    out = unet_prediction(pipe.unet, torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), cond)
    assert out.shape == (2, 4, 16, 16)


def test_padded_neighbour_forward_swaps_caption_and_pooled_and_keeps_time_ids(tiny_sdxl_path):
    """The CUDA-graph path's computation (static full-batch buffers for hidden states, pooled embeddings and time
    ids; run eagerly here) gives the compact eager predictions of the neighbour rows: the neighbour's caption and
    `text_embeds` on the sample's own `time_ids`."""
    from diffusers import UNet2DConditionModel

    from pogdiff.training import GraphedNeighborForward

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 16, 16, generator=g), torch.tensor([10, 200, 500, 900])
    own = Conditioning(
        torch.randn(4, 77, 64, generator=g),
        torch.randn(4, 32, generator=g),
        torch.rand(4, 6, generator=g) * 64,
    )
    rows = torch.tensor([0, 3])
    neighbour_text = Conditioning(torch.randn(2, 77, 64, generator=g), torch.randn(2, 32, generator=g))
    cond = neighbor_conditioning(own, neighbour_text, rows)
    with torch.no_grad():
        padded = GraphedNeighborForward(unet, use_graph=False)(x, t, cond, rows)
        compact = unet_prediction(unet, x[rows], t[rows], cond)
        # The time ids matter: the same rows with other time ids predict something else.
        other = unet_prediction(
            unet, x[rows], t[rows], Conditioning(cond.hidden_states, cond.text_embeds, cond.time_ids + 100)
        )
    torch.testing.assert_close(padded, compact, rtol=1e-4, atol=1e-5)
    assert (other - compact).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Training, resume and every loading route
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.long(seconds=28)
def test_the_sd_command_line_trains_sdxl_and_resumes_bitwise(
    tiny_sd_path, tiny_sdxl_path, tiny_dataset_path, tmp_path
):
    """One command line: the SD test's, with only the model changed (through `accelerate launch`), PoGDiff with
    its same-caption skips, random crops and flips. Then a resume from the mid-run checkpoint equals it."""
    common = ("--checkpointing_steps", "2", "--random_flip", "--objective", "pogdiff")
    straight = tmp_path / "straight"
    proc = accelerate_launch(train_args(tiny_sdxl_path, tiny_dataset_path, straight, *common, steps=4))
    assert "Model family: sdxl (StableDiffusionXLPipeline)" in proc.stderr
    assert (
        json.loads((straight / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    )
    assert (straight / "text_encoder_2").is_dir()
    # The index's text density saw the SDXL pooled embedding (the second encoder's projection: 32 wide here).
    (index_dir,) = [p for p in straight.iterdir() if p.name.startswith("pogdiff-index-")]
    assert json.loads((index_dir / "index.json").read_text())["config"]["text_embedding_dim"] == 32

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("checkpoint-4"))
    # Launched as the straight run was (a bitwise comparison wants the same process setup, threads included).
    accelerate_launch(
        train_args(
            tiny_sdxl_path, tiny_dataset_path, resumed, *common, "--resume_from_checkpoint", "checkpoint-2", steps=4,
        )
    )  # fmt: skip
    assert_same_tensors(unet_state(straight), unet_state(resumed))
    assert_same_tensors(unet_state(straight / "checkpoint-4"), unet_state(resumed / "checkpoint-4"))

    # Every loading route of the full result gives the same images; plain diffusers loads its own SDXL class.
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    from pipeline_pogdiff import PoGDiffPipeline, PoGDiffXLPipeline

    reference = sample(PoGDiffXLPipeline.from_pretrained(straight))
    routes = {
        "PoGDiffPipeline": PoGDiffPipeline.from_pretrained(straight),
        "checkpoint-4": PoGDiffPipeline.from_pretrained(straight / "checkpoint-4"),
        "custom_pipeline": DiffusionPipeline.from_pretrained(
            straight, custom_pipeline=str(straight), trust_remote_code=True
        ),
    }
    for name, pipe in routes.items():
        assert type(pipe) is PoGDiffXLPipeline or type(pipe).__name__ == "PoGDiffXLPipeline", name
        assert np.array_equal(sample(pipe), reference), name
    assert type(DiffusionPipeline.from_pretrained(straight)) is StableDiffusionXLPipeline


@pytest.fixture(scope="module")
def sdxl_lora_run(tiny_sdxl_path, tiny_dataset_path, tmp_path_factory) -> Path:
    """An SDXL LoRA run with the paper's literal gradient (--neighbor_grad), caption dropout and a checkpoint."""
    out = tmp_path_factory.mktemp("sdxl-lora") / "lora-xl"
    run_in_process(
        train_args(
            tiny_sdxl_path, tiny_dataset_path, out, "--use_lora", "--rank", "4", "--lora_alpha", "8",
            "--neighbor_grad", "--caption_dropout_prob", "0.25", "--checkpointing_steps", "2",
            "--validation_prompts", "An image of chen.", "--num_validation_inference_steps", "2",
        )
    )  # fmt: skip
    return out


@pytest.mark.e2e
def test_every_loading_route_of_an_sdxl_lora_result_gives_the_same_images(sdxl_lora_run, tiny_sdxl_path):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    from pipeline_pogdiff import PoGDiffPipeline, PoGDiffXLPipeline

    out = sdxl_lora_run
    assert (out / "validation").is_dir() and (out / "val_imgs_grid.png").is_file()
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_sdxl_path}" in card and "stable-diffusion-xl" in card

    ours = PoGDiffPipeline.from_pretrained(out)  # the SD class hands an SDXL result to the XL one
    assert type(ours) is PoGDiffXLPipeline
    reference = sample(ours)
    routes = {
        "PoGDiffXLPipeline": PoGDiffXLPipeline.from_pretrained(out),
        "checkpoint-2": PoGDiffPipeline.from_pretrained(out / "checkpoint-2"),
        # The card's snippet: the base with this result's pipeline.py (diffusers' custom_pipeline), then the LoRA.
        "custom_pipeline": DiffusionPipeline.from_pretrained(
            tiny_sdxl_path, custom_pipeline=str(out), trust_remote_code=True
        ),
    }
    routes["custom_pipeline"].load_lora_weights(str(out))
    assert type(routes["custom_pipeline"]).__name__ == "PoGDiffXLPipeline"
    # The kohya-format file (AUTOMATIC1111, ComfyUI) on the base gives the same images.
    kohya = out / f"{out.name}.safetensors"
    assert all(k.startswith("lora_unet_") for k in load_file(kohya))
    routes["kohya file"] = PoGDiffXLPipeline.from_pretrained(tiny_sdxl_path)
    routes["kohya file"].load_lora_weights(str(out), weight_name=kohya.name)
    for name, pipe in routes.items():
        assert np.array_equal(sample(pipe), reference), name
    # The adapters changed the images (the base alone differs).
    assert np.abs(sample(PoGDiffXLPipeline.from_pretrained(tiny_sdxl_path)) - reference).max() > 1e-4
    # Plain diffusers with the base's own class loads the adapters too.
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    plain.load_lora_weights(str(out))
    assert plain.unet.peft_config["default_0"].lora_alpha == 8


@pytest.mark.e2e
def test_evaluation_runs_on_an_sdxl_result(sdxl_lora_run, tiny_dataset_path, tmp_path):
    import evaluate_pogdiff

    report = evaluate_pogdiff.main(
        [
            "--model", f"xl={sdxl_lora_run}",
            "--train_data_dir", tiny_dataset_path,
            "--images_per_identity", "2",
            "--num_inference_steps", "2",
            "--feature_extractor", "pixels",
            "--grecall_threshold", "0.05",
            "--device", "cpu",
            "--output_dir", str(tmp_path / "eval"),
        ]
    )  # fmt: skip
    assert set(report["models"]) == {"xl"}
    # Generated at the run's training resolution (its run record), per identity.
    generated = sorted((tmp_path / "eval" / "xl").glob("*/*.png"))
    assert len(generated) == 2 * 4 and Image.open(generated[0]).size == (32, 32)
    assert (tmp_path / "eval" / "grid_few_shot.png").is_file()


@pytest.mark.e2e
def test_sdxl_script_flags_a_vae_of_ones_own_and_proportion_empty_prompts(
    tiny_sdxl_path, tiny_dataset_path, tmp_path
):
    """diffusers' SDXL flags: --pretrained_vae_model_name_or_path trains and saves with that VAE (whole folder),
    and --proportion_empty_prompts is --caption_dropout_prob under its SDXL-script name."""
    import train_pogdiff
    from pogdiff.testing import build_tiny_sd

    assert train_pogdiff.parse_args(
        train_args(tiny_sdxl_path, tiny_dataset_path, tmp_path / "x", "--proportion_empty_prompts", "0.3")
    ).caption_dropout_prob == pytest.approx(0.3)

    other_vae = Path(build_tiny_sd(tmp_path / "other", seed=1)) / "vae"
    out = tmp_path / "own-vae"
    run_in_process(
        train_args(
            tiny_sdxl_path, tiny_dataset_path, out, "--objective", "vanilla",
            "--pretrained_vae_model_name_or_path", str(other_vae), "--proportion_empty_prompts", "0.5",
        )
    )  # fmt: skip
    saved = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(saved, load_file(other_vae / "diffusion_pytorch_model.safetensors"))
    base = load_file(Path(tiny_sdxl_path) / "vae" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(saved[k], base[k]) for k in saved)
