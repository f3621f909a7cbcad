"""PoGDiffPipeline: DDIM by default, same images as Stable Diffusion + DDIM, full and LoRA loading."""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from huggingface_hub import ModelCard, ModelCardData

from pipeline_pogdiff import PoGDiffPipeline
from pogdiff.testing import TINY_DATASET_COUNTS, TINY_RESOLUTION

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "An image of alice."


def _sample(pipe, seed: int = 0, steps: int = 3) -> np.ndarray:
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


def test_tiny_model_loads_in_plain_diffusers_and_generates(tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.steps_offset == 1
    images = _sample(pipe, steps=2)
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(images).all()
    # A random model still produces an image with content (not a constant) in [0, 1].
    assert images.std() > 0.0 and images.min() >= 0.0 and images.max() <= 1.0


def test_tiny_build_is_deterministic(tmp_path):
    from pogdiff.testing import build_tiny_sd

    a = StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path / "a"))
    b = StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path / "b"))
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_dataset_layout(tiny_dataset_path):
    rows = [json.loads(line) for line in open(Path(tiny_dataset_path) / "metadata.jsonl")]
    counts: dict[str, int] = {}
    for row in rows:
        assert set(row) == {"file_name", "text", "identity"}
        assert row["text"] == f"An image of {row['identity']}."
        assert (Path(tiny_dataset_path) / row["file_name"]).is_file()
        counts[row["identity"]] = counts.get(row["identity"], 0) + 1
    assert counts == TINY_DATASET_COUNTS


def test_pogdiff_pipeline_is_ddim_50_and_matches_sd_with_ddim(tiny_sd_path):
    pipe = PoGDiffPipeline.from_pretrained(tiny_sd_path)
    assert isinstance(pipe, PoGDiffPipeline)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert inspect.signature(PoGDiffPipeline.__call__).parameters["num_inference_steps"].default == 50
    pipe.set_progress_bar_config(disable=True)

    ref = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    assert np.array_equal(_sample(pipe), _sample(ref))


def test_custom_pipeline_loading_returns_pogdiff_pipeline(tiny_sd_path):
    pipe = DiffusionPipeline.from_pretrained(
        tiny_sd_path, custom_pipeline=str(REPO_ROOT / "pipeline_pogdiff.py"), trust_remote_code=True
    )
    assert type(pipe).__name__ == "PoGDiffPipeline"
    assert isinstance(pipe.scheduler, DDIMScheduler)


def test_save_pretrained_stays_loadable_by_plain_diffusers(tiny_sd_path, tmp_path):
    pipe = PoGDiffPipeline.from_pretrained(tiny_sd_path)
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(reloaded) is StableDiffusionPipeline


def _write_lora_result(tiny_sd_path: str, folder: Path) -> None:
    """What train_pogdiff.py --use_lora writes: LoRA weights and a model card naming the base model."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.5)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet), safe_serialization=True
    )
    ModelCard.from_template(ModelCardData(base_model=tiny_sd_path, library_name="diffusers")).save(
        folder / "README.md"
    )


def test_lora_round_trip(tiny_sd_path, tmp_path):
    lora_dir = tmp_path / "lora"
    _write_lora_result(tiny_sd_path, lora_dir)

    pipe = PoGDiffPipeline.from_pretrained(lora_dir)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)

    manual = PoGDiffPipeline.from_pretrained(tiny_sd_path)
    manual.load_lora_weights(lora_dir)
    manual.set_progress_bar_config(disable=True)

    base = PoGDiffPipeline.from_pretrained(tiny_sd_path)
    base.set_progress_bar_config(disable=True)

    with_lora = _sample(pipe)
    assert np.array_equal(with_lora, _sample(manual))
    assert np.abs(with_lora - _sample(base)).max() > 1e-3


def test_lora_without_model_card_names_the_fix(tiny_sd_path, tmp_path):
    lora_dir = tmp_path / "lora"
    _write_lora_result(tiny_sd_path, lora_dir)
    (lora_dir / "README.md").unlink()
    with pytest.raises(ValueError, match="base_model"):
        PoGDiffPipeline.from_pretrained(lora_dir)


def test_folder_with_neither_layout_gives_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="neither a full pipeline .*model_index.json.* nor LoRA"):
        PoGDiffPipeline.from_pretrained(tmp_path)


def test_lora_card_naming_a_missing_base_says_it_came_from_the_card(tiny_sd_path, tmp_path):
    lora_dir = tmp_path / "lora"
    _write_lora_result(tiny_sd_path, lora_dir)
    card = lora_dir / "README.md"
    card.write_text(card.read_text().replace(tiny_sd_path, str(tmp_path / "moved-away")))
    with pytest.raises(ValueError, match=r"named by `base_model:` in the model card .*README.md") as caught:
        PoGDiffPipeline.from_pretrained(lora_dir)
    assert "moved-away" in str(caught.value) and "load_lora_weights" in str(caught.value)
