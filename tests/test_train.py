"""train_pogdiff.py on the tiny model and dataset: outputs, objectives, resume, checkpoints, errors.

Most runs are in-process (`train_pogdiff.run`, accelerate state reset between runs); the end-to-end ones go
through the real launchers (`accelerate launch`, `torchrun --nproc_per_node 2`).
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
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from pogdiff.testing import run_process_group

REPO = Path(__file__).resolve().parent.parent

# Every flag of diffusers' examples/text_to_image/train_text_to_image.py: a user's command line must keep working.
TRAIN_TEXT_TO_IMAGE_FLAGS = [
    "--input_perturbation", "--pretrained_model_name_or_path", "--revision", "--variant", "--dataset_name",
    "--dataset_config_name", "--train_data_dir", "--image_column", "--caption_column", "--max_train_samples",
    "--validation_prompts", "--output_dir", "--cache_dir", "--seed", "--resolution", "--center_crop",
    "--random_flip", "--train_batch_size", "--num_train_epochs", "--max_train_steps",
    "--gradient_accumulation_steps", "--gradient_checkpointing", "--learning_rate", "--scale_lr", "--lr_scheduler",
    "--lr_warmup_steps", "--snr_gamma", "--dream_training", "--dream_detail_preservation", "--use_8bit_adam",
    "--allow_tf32", "--use_ema", "--offload_ema", "--foreach_ema", "--non_ema_revision", "--dataloader_num_workers",
    "--adam_beta1", "--adam_beta2", "--adam_weight_decay", "--adam_epsilon", "--max_grad_norm", "--push_to_hub",
    "--hub_token", "--prediction_type", "--hub_model_id", "--logging_dir", "--mixed_precision", "--report_to",
    "--local_rank", "--checkpointing_steps", "--checkpoints_total_limit", "--resume_from_checkpoint",
    "--enable_xformers_memory_efficient_attention", "--noise_offset", "--validation_epochs", "--tracker_project_name",
    "--image_interpolation_mode",
]  # fmt: skip


def train_args(model: str, data: str, out: Path, *extra: str, steps: int = 2) -> list[str]:
    return [
        "--pretrained_model_name_or_path", model,
        "--train_data_dir", data,
        "--output_dir", str(out),
        "--resolution", "32",
        "--train_batch_size", "4",
        "--max_train_steps", str(steps),
        "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0",
        "--seed", "0",
        "--neighbor_encoder", "vae",
        "--num_neighbors", "3",
        "--density_epochs", "5",
        "--checkpointing_steps", "1000",
        *extra,
    ]  # fmt: skip


def run_in_process(argv: list[str]) -> None:
    """Run train_pogdiff in this process, as `python train_pogdiff.py ...` would (fresh accelerate state)."""
    from accelerate.state import AcceleratorState, GradientState

    import train_pogdiff

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_pogdiff.run(argv)


def training_logs(folder: Path) -> dict[str, list[float]]:
    """Every scalar the run logged to TensorBoard, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs: dict[str, list[float]] = {}
    for path in sorted((folder / "logs").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            logs[tag] = [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]
    return logs


def unet_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def sample(pipe, steps: int = 2) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "An image of chen.",
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def base_unet(tiny_sd_path) -> dict[str, torch.Tensor]:
    return unet_state(Path(tiny_sd_path))


def train_pogdiff_parser_actions() -> list:
    """The trainer's argparse actions in declaration order (read from the parser parse_args builds)."""
    import argparse

    import train_pogdiff

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        captured["actions"] = list(self._actions)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            train_pogdiff.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["actions"]


def test_help_lists_every_train_text_to_image_flag(capsys):
    import train_pogdiff

    with pytest.raises(SystemExit) as exit_info:
        train_pogdiff.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    missing = [flag for flag in TRAIN_TEXT_TO_IMAGE_FLAGS if flag not in help_text]
    assert not missing, f"--help lacks {missing}"
    for flag in ("--objective", "--num_neighbors", "--psi_a1", "--psi_terms", "--use_lora", "--sampling"):
        assert flag in help_text

    # Upstream's flags in upstream's order (the list above is upstream's order), then one PoGDiff group with
    # every other flag: a side-by-side read of the two parse_args lines up.
    parser_flags = [
        a.option_strings[0] for a in train_pogdiff_parser_actions() if a.option_strings and a.dest != "help"
    ]
    assert parser_flags[: len(TRAIN_TEXT_TO_IMAGE_FLAGS)] == TRAIN_TEXT_TO_IMAGE_FLAGS
    group = "PoGDiff (flags that train_text_to_image.py does not have):"
    assert help_text.count(group) == 1
    after_group = help_text.split(group, 1)[1]
    for flag in parser_flags[len(TRAIN_TEXT_TO_IMAGE_FLAGS) :]:
        assert f"  {flag} " in after_group or f"  {flag}\n" in after_group, flag
    for flag in TRAIN_TEXT_TO_IMAGE_FLAGS:
        assert f"  {flag} " not in after_group and f"  {flag}\n" not in after_group, flag


def test_defaults_match_train_text_to_image():
    import train_pogdiff

    args = train_pogdiff.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y"])
    assert (args.resolution, args.train_batch_size, args.num_train_epochs, args.learning_rate) == (
        512,
        16,
        100,
        1e-4,
    )
    assert (args.lr_scheduler, args.lr_warmup_steps, args.checkpointing_steps, args.validation_epochs) == (
        "constant",
        500,
        500,
        5,
    )
    assert (args.adam_weight_decay, args.max_grad_norm, args.output_dir) == (1e-2, 1.0, "sd-model-finetuned")
    assert (args.objective, args.num_neighbors, args.psi_a1, args.psi_a2, args.psi_a3) == (
        "pogdiff",
        5,
        1,
        1,
        1,
    )


@pytest.mark.e2e
def test_pogdiff_full_finetune_through_accelerate_launch(
    tiny_sd_path, tiny_dataset_path, tmp_path, base_unet
):
    out = tmp_path / "out"
    argv = train_args(
        tiny_sd_path,
        tiny_dataset_path,
        out,
        "--validation_prompts", "An image of chen.",
        "--num_validation_inference_steps", "2",
    )  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_process_group(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
         str(REPO / "train_pogdiff.py"), *argv],
        cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    # Plain diffusers and PoGDiffPipeline both load and run what was saved.
    from pipeline_pogdiff import PoGDiffPipeline

    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    plain = StableDiffusionPipeline.from_pretrained(out)
    ours = PoGDiffPipeline.from_pretrained(out)
    assert np.isfinite(sample(plain)).all() and np.isfinite(sample(ours)).all()

    trained = unet_state(out)
    changed = [k for k in trained if not torch.equal(trained[k], base_unet[k])]
    assert len(changed) > len(trained) // 2

    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_sd_path}" in card
    for needle in ("objective", "psi_a1", "num_neighbors", "PoGDiffPipeline", "vae"):
        assert needle in card
    assert (out / "val_imgs_grid.png").is_file()
    assert sorted(p.name for p in (out / "validation").iterdir())  # the epoch grids
    # The neighbour index was cached in output_dir and psi statistics were logged.
    assert any(p.name.startswith("pogdiff-index-") for p in out.iterdir())
    assert "Expected psi per sample" in proc.stderr


def test_lora_run_loads_and_changes_only_lora(tiny_sd_path, tiny_dataset_path, tmp_path, base_unet):
    out = tmp_path / "lora"
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, out, "--use_lora", "--rank", "4"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "model_index.json").exists()
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all("lora" in k for k in lora)
    # lora_B starts at zero (gaussian init); training moved it.
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)

    from pipeline_pogdiff import PoGDiffPipeline

    pipe = PoGDiffPipeline.from_pretrained(out)
    state = pipe.unet.state_dict()
    base_keys = {k.replace(".base_layer", ""): k for k in state if "lora_" not in k}
    # Every non-LoRA weight is exactly the base model's.
    assert set(base_keys) == set(base_unet)
    assert all(torch.equal(state[base_keys[k]], base_unet[k]) for k in base_unet)
    base_pipe = PoGDiffPipeline.from_pretrained(tiny_sd_path)
    assert np.abs(sample(pipe) - sample(base_pipe)).max() > 0


@pytest.mark.parametrize("objective", ["vanilla", "cbdm", "t2h"])
def test_baseline_objectives_train(objective, tiny_sd_path, tiny_dataset_path, tmp_path, base_unet):
    out = tmp_path / objective
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, out, "--objective", objective))
    trained = unet_state(out)
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], base_unet[k]) for k in trained)


def test_pogdiff_with_zero_psi_equals_vanilla_bitwise(tiny_sd_path, tiny_dataset_path, tmp_path):
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "v", "--objective", "vanilla"))
    run_in_process(
        train_args(
            tiny_sd_path, tiny_dataset_path, tmp_path / "p", "--objective", "pogdiff", "--psi_terms", "none"
        )
    )
    assert_same_tensors(unet_state(tmp_path / "v"), unet_state(tmp_path / "p"))
    # ...while real psi changes the result (the consistency term acts).
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "q", "--objective", "pogdiff"))
    q = unet_state(tmp_path / "q")
    v = unet_state(tmp_path / "v")
    assert any(not torch.equal(q[k], v[k]) for k in q)


def test_neighbor_grad_trains_and_changes_the_update(tiny_sd_path, tiny_dataset_path, tmp_path):
    """--neighbor_grad (Algorithm 1) runs through the trainer and, with the same draws, moves the weights
    differently from the stop-gradient default; its choice is on the model card."""
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "sg", "--objective", "pogdiff"))
    run_in_process(
        train_args(
            tiny_sd_path, tiny_dataset_path, tmp_path / "ng", "--objective", "pogdiff", "--neighbor_grad"
        )
    )
    sg, ng = unet_state(tmp_path / "sg"), unet_state(tmp_path / "ng")
    assert all(torch.isfinite(v).all() for v in ng.values())
    assert any(not torch.equal(sg[k], ng[k]) for k in sg)
    assert "| neighbor_grad | True |" in (tmp_path / "ng" / "README.md").read_text()


def test_sampling_power_aliases_and_density_sampling(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    """--sampling_power 0 is --sampling balanced (same draws, same weights); --sampling density needs no
    identity labels and draws the 2-image identities more often than uniform shuffling does."""
    common = ("--objective", "vanilla")
    run_in_process(
        train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "b", *common, "--sampling", "balanced")
    )
    run_in_process(
        train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "p0", *common, "--sampling_power", "0")
    )
    assert_same_tensors(unet_state(tmp_path / "b"), unet_state(tmp_path / "p0"))
    counts = json.loads((tmp_path / "p0" / "sample_counts.json").read_text())
    assert counts["sampling"] == "uniform" and counts["sampling_power"] == 0.0

    run_in_process(
        train_args(
            tiny_sd_path, tiny_dataset_path, tmp_path / "d", *common, "--sampling", "density", steps=8,
        )
    )  # fmt: skip
    # The identity column is only read back for this count: the draw weights come from the captions alone.
    drawn = json.loads((tmp_path / "d" / "sample_counts.json").read_text())["samples_per_identity"]
    assert sum(drawn.values()) == 8 * 4 and (drawn["chen"] + drawn["dara"]) / 32 > 4 / 16

    _expect_error(
        train_args(
            tiny_sd_path, tiny_dataset_path, tmp_path / "x", "--sampling", "sqrt", "--sampling_power", "0.2"
        ),
        capsys,
        "give one",
    )


def _resume_pair(tiny_sd_path, tiny_dataset_path, tmp_path, *extra):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--checkpointing_steps", "2", "--random_flip", "--gradient_accumulation_steps", "2", *extra)
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, straight, *common, steps=4))
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, resumed, *common, steps=2))
    assert (resumed / "checkpoint-2").is_dir()
    run_in_process(
        train_args(
            tiny_sd_path, tiny_dataset_path, resumed, *common, "--resume_from_checkpoint", "latest", steps=4
        )
    )
    return straight, resumed


def test_resume_equals_uninterrupted_full_with_ema(tiny_sd_path, tiny_dataset_path, tmp_path):
    straight, resumed = _resume_pair(tiny_sd_path, tiny_dataset_path, tmp_path, "--use_ema")
    assert_same_tensors(unet_state(straight / "checkpoint-4"), unet_state(resumed / "checkpoint-4"))
    assert_same_tensors(
        load_file(straight / "checkpoint-4" / "unet_ema" / "diffusion_pytorch_model.safetensors"),
        load_file(resumed / "checkpoint-4" / "unet_ema" / "diffusion_pytorch_model.safetensors"),
    )
    assert_same_tensors(unet_state(straight), unet_state(resumed))  # the saved (EMA) model


def test_resume_equals_uninterrupted_lora_balanced_sampling(tiny_sd_path, tiny_dataset_path, tmp_path):
    straight, resumed = _resume_pair(
        tiny_sd_path, tiny_dataset_path, tmp_path, "--use_lora", "--sampling", "balanced"
    )
    assert_same_tensors(
        load_file(straight / "pytorch_lora_weights.safetensors"),
        load_file(resumed / "pytorch_lora_weights.safetensors"),
    )
    # The resumed run continued the same sample stream (counts are checkpointed with the run).
    counts = json.loads((straight / "sample_counts.json").read_text())
    assert counts == json.loads((resumed / "sample_counts.json").read_text())
    assert sum(counts["samples_per_identity"].values()) == 4 * 2 * 4  # steps x accumulation x batch


def test_checkpoints_total_limit_keeps_the_newest(tiny_sd_path, tiny_dataset_path, tmp_path):
    out = tmp_path / "ckpt"
    run_in_process(
        train_args(
            tiny_sd_path,
            tiny_dataset_path,
            out,
            "--objective", "vanilla",
            "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "2",
            "--train_batch_size", "2",
            steps=4,
        )
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.e2e
@pytest.mark.multi_process
def test_two_process_cpu_run(tiny_sd_path, tiny_dataset_path, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = run_process_group(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train_pogdiff.py"),
         *train_args(tiny_sd_path, tiny_dataset_path, out, "--train_batch_size", "2", "--sampling", "balanced")],
        cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Num processes: 2" in proc.stderr
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in proc.stderr
    checksum_line = next(line for line in proc.stderr.splitlines() if "checksum per rank" in line)
    values = json.loads(checksum_line.split("rank: ")[1])
    assert len(values) == 2 and values[0] == values[1]
    assert (out / "model_index.json").is_file()
    # Both ranks' draws are counted: 2 steps x 2 ranks x batch 2.
    counts = json.loads((out / "sample_counts.json").read_text())
    assert sum(counts["samples_per_identity"].values()) == 8


def test_cache_latents_matches_uncached_training(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    common = ("--objective", "pogdiff", "--center_crop")
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "plain", *common))
    run_in_process(
        train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "cached", *common, "--cache_latents")
    )
    # Same draws, same latent distributions: only the VAE's batch composition differs (float rounding), so
    # every logged loss agrees to float32 rounding. Not the weights entry by entry: Adam's first steps move a
    # weight by about lr * sign(gradient), so a weight whose true gradient is ~0 moves by +-lr on rounding noise
    # alone (seen: 3.8e-4 apart with one thread, below 1e-4 with two).
    plain, cached = training_logs(tmp_path / "plain"), training_logs(tmp_path / "cached")
    assert set(plain) == set(cached) and {"train_loss", "loss_main", "loss_consistency"} <= set(plain)
    for tag in plain:
        np.testing.assert_allclose(cached[tag], plain[tag], rtol=1e-4, atol=1e-7, err_msg=tag)
    # Random crops would be frozen into the cache: refused.
    _expect_error(
        train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "x", "--cache_latents"),
        capsys,
        "--center_crop",
    )


# ---- bad input: one clear message, non-zero exit, no traceback -------------------------------------------------


def _expect_error(argv: list[str], capsys, *needles: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err[-2000:]
    return err


def test_missing_caption_column_lists_columns(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    argv = train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "o", "--caption_column", "prompt")
    _expect_error(argv, capsys, "--caption_column", "prompt", "text", "identity")


def test_unreadable_image_names_its_path(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, data)
    (data / "chen_001.png").write_bytes(b"this is not a png")
    argv = train_args(tiny_sd_path, str(data), tmp_path / "o")
    _expect_error(argv, capsys, "chen_001.png")


def test_num_neighbors_too_large(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    argv = train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "o", "--num_neighbors", "16")
    _expect_error(argv, capsys, "--num_neighbors", "16")


def test_cuda_graph_neighbour_forward_needs_cuda(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    argv = train_args(
        tiny_sd_path,
        tiny_dataset_path,
        tmp_path / "o",
        "--objective",
        "pogdiff",
        "--neighbor_forward",
        "cuda_graph",
    )
    _expect_error(
        argv, capsys, "--neighbor_forward cuda_graph needs a CUDA device", "--neighbor_forward eager"
    )


def test_empty_dataset(tiny_sd_path, tmp_path, capsys):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "metadata.jsonl").write_text("")
    _expect_error(train_args(tiny_sd_path, str(data), tmp_path / "o"), capsys, str(data))


def test_single_image_identity_warns(tiny_sd_path, tiny_dataset_path, tmp_path, caplog, recwarn):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["file_name"] != "dara_001.png"]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "dara_001.png").unlink()
    run_in_process(train_args(tiny_sd_path, str(data), tmp_path / "o", "--objective", "vanilla", steps=1))
    messages = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert any("dara" in m and ">= 2" in m for m in messages), messages


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(
    tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    out = tmp_path / "nan"
    argv = train_args(
        tiny_sd_path,
        tiny_dataset_path,
        out,
        "--objective", "vanilla",
        "--learning_rate", "1e30",
        "--max_grad_norm", "1e30",
        "--checkpointing_steps", "1",
        steps=6,
    )  # fmt: skip
    err = _expect_error(argv, capsys, "Non-finite loss", "at step")
    failed_step = int(err.split("at step ")[1].split()[0])
    assert failed_step >= 2
    # Every step before the failure was checkpointed, completely; nothing after it.
    names = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    assert names == [f"checkpoint-{s}" for s in range(1, failed_step)]
    assert (out / f"checkpoint-{failed_step - 1}" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_push_to_hub_uploads_the_model_not_the_checkpoints(
    tiny_sd_path, tiny_dataset_path, tmp_path, monkeypatch
):
    """No wandb, no validation prompts (both crashed upstream's push) and checkpoints stay local."""
    import train_pogdiff

    calls = {}
    monkeypatch.setattr(
        train_pogdiff, "create_repo", lambda repo_id, **kw: type("R", (), {"repo_id": repo_id})
    )
    monkeypatch.setattr(train_pogdiff, "upload_folder", lambda **kw: calls.update(kw))
    out = tmp_path / "hub"
    run_in_process(
        train_args(
            tiny_sd_path, tiny_dataset_path, out, "--objective", "vanilla", "--checkpointing_steps", "1",
            "--push_to_hub", "--hub_model_id", "me/pogdiff-test",
        )
    )  # fmt: skip
    assert calls["repo_id"] == "me/pogdiff-test" and calls["folder_path"] == str(out)
    import fnmatch

    uploaded = [
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file()
        and not any(fnmatch.fnmatch(p.relative_to(out).as_posix(), pat) for pat in calls["ignore_patterns"])
    ]
    assert "model_index.json" in uploaded and "README.md" in uploaded
    assert not [p for p in uploaded if p.startswith(("checkpoint-", "pogdiff-index-", "logs/"))], uploaded
    # Exactly the model, its card, the pipeline code and the draw counts: no training state, lock, index or log.
    assert sorted({p.split("/")[0] for p in uploaded}) == [
        "README.md", "model_index.json", "pipeline.py", "sample_counts.json",
        "scheduler", "text_encoder", "tokenizer", "unet", "vae",
    ]  # fmt: skip
    card = (out / "README.md").read_text()
    assert "me/pogdiff-test" in card and 'custom_pipeline="me/pogdiff-test"' in card

    # The repo as pushed (only the uploaded files) loads both ways, to the same images as the output folder.
    from diffusers import DiffusionPipeline

    from pipeline_pogdiff import PoGDiffPipeline

    repo = tmp_path / "pushed-repo"
    for name in uploaded:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / name, repo / name)
    custom = DiffusionPipeline.from_pretrained(repo, custom_pipeline=str(repo), trust_remote_code=True)
    assert type(custom).__name__ == "PoGDiffPipeline" and type(custom.scheduler).__name__ == "DDIMScheduler"
    plain = DiffusionPipeline.from_pretrained(repo)
    assert type(plain).__name__ == "StableDiffusionPipeline"
    assert np.array_equal(sample(custom), sample(PoGDiffPipeline.from_pretrained(out)))


def test_lora_bf16_mixed_precision_runs(tiny_sd_path, tiny_dataset_path, tmp_path):
    out = tmp_path / "bf16"
    run_in_process(
        train_args(tiny_sd_path, tiny_dataset_path, out, "--use_lora", "--mixed_precision", "bf16")
    )
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in lora.values())
    from pipeline_pogdiff import PoGDiffPipeline

    assert np.isfinite(sample(PoGDiffPipeline.from_pretrained(out))).all()


def test_model_card_names_a_local_base_absolutely(tmp_path, monkeypatch):
    """A relative --pretrained_model_name_or_path would stop resolving once the result is loaded elsewhere."""
    from pogdiff.checkpointing import base_model_reference

    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert base_model_reference("models/base") == str(tmp_path / "models" / "base")
    assert base_model_reference("stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )


def test_rows_with_several_captions_train_and_resume_exactly(tiny_sd_path, tiny_dataset_path, tmp_path):
    """A caption list per row (train_text_to_image picks one at random): PoGDiff trains, and a resumed run
    equals the uninterrupted one (the caption choice is a function of seed, epoch and row)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["text"] = [row["text"], f"{row['text'][:-1]}, picture {i % 3}."]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    straight, resumed = _resume_pair(tiny_sd_path, str(data), tmp_path, "--objective", "pogdiff")
    assert_same_tensors(unet_state(straight), unet_state(resumed))


def test_lora_alpha_survives_and_the_webui_file_gives_the_same_images(
    tiny_sd_path, tiny_dataset_path, tmp_path
):
    """--lora_alpha other than the rank: the diffusers file keeps it (adapter metadata), and the kohya-format
    file for AUTOMATIC1111 / ComfyUI loads back into diffusers to the very same images (alpha 8 / rank 4 = 2 is a
    power of two, so folding it into the weights is exact)."""
    from pipeline_pogdiff import PoGDiffPipeline

    out = tmp_path / "lora-a8"
    run_in_process(
        train_args(tiny_sd_path, tiny_dataset_path, out, "--use_lora", "--rank", "4", "--lora_alpha", "8")
    )
    webui = out / "lora-a8.safetensors"
    kohya = load_file(webui)
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    diffusers_keys = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(kohya) == len(diffusers_keys) * 3 // 2  # down, up and alpha per adapted layer

    pipe = PoGDiffPipeline.from_pretrained(out)
    assert pipe.unet.peft_config["default_0"].lora_alpha == 8
    from_webui = PoGDiffPipeline.from_pretrained(tiny_sd_path)  # the same (DDIM) sampler, then the kohya file
    from_webui.load_lora_weights(str(out), weight_name=webui.name)
    assert np.array_equal(sample(pipe), sample(from_webui))
    assert np.abs(sample(pipe) - sample(PoGDiffPipeline.from_pretrained(tiny_sd_path))).max() > 1e-3


@pytest.mark.parametrize("kind", ["full", "ema", "lora"])
def test_any_checkpoint_opens_for_inference(kind, tiny_sd_path, tiny_dataset_path, tmp_path):
    """PoGDiffPipeline.from_pretrained("out/checkpoint-N"): the last checkpoint gives the final model's images
    (full + EMA: the EMA UNet, which the final save copies in; LoRA: its adapters on the recorded base)."""
    from pipeline_pogdiff import PoGDiffPipeline

    out = tmp_path / kind
    extra = {"full": (), "ema": ("--use_ema",), "lora": ("--use_lora", "--rank", "4")}[kind]
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, out, "--checkpointing_steps", "1", *extra))
    final = sample(PoGDiffPipeline.from_pretrained(out))
    assert np.array_equal(sample(PoGDiffPipeline.from_pretrained(out / "checkpoint-2")), final)
    first = sample(PoGDiffPipeline.from_pretrained(out / "checkpoint-1"))
    assert np.abs(first - final).max() > 0
    if kind == "ema":
        raw = sample(PoGDiffPipeline.from_pretrained(out / "checkpoint-2", use_ema=False))
        assert np.abs(raw - final).max() > 0  # the raw UNet is not the EMA one


def test_a_checkpoint_whose_base_is_gone_says_where_the_name_came_from(
    tiny_sd_path, tiny_dataset_path, tmp_path
):
    from pipeline_pogdiff import PoGDiffPipeline

    out = tmp_path / "run"
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, out, "--checkpointing_steps", "2"))
    record = out / "checkpoint-2" / "pogdiff_run.json"
    data = json.loads(record.read_text())
    data["settings"]["--pretrained_model_name_or_path"] = str(tmp_path / "moved-base")
    record.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"on its base model .*moved-base.* \(named by its pogdiff_run.json\)"
    ):
        PoGDiffPipeline.from_pretrained(out / "checkpoint-2")


def test_sampling_weight_column_drives_the_draws(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    """kohya-style repeats as a column: weight 0 on every image of alice and bruno leaves only chen and dara."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["repeats"] = 0 if row["identity"] in ("alice", "bruno") else 2
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    run_in_process(
        train_args(
            tiny_sd_path, str(data), out, "--objective", "vanilla", "--sampling_weight_column", "repeats"
        )
    )
    counts = json.loads((out / "sample_counts.json").read_text())["samples_per_identity"]
    assert counts["alice"] == counts["bruno"] == 0 and counts["chen"] + counts["dara"] == 2 * 4
    _expect_error(
        train_args(tiny_sd_path, str(data), tmp_path / "x", "--sampling_weight_column", "nope"),
        capsys,
        "--sampling_weight_column 'nope' is not a column",
    )


def test_model_card_names_the_seed_a_run_drew(tiny_sd_path, tiny_dataset_path, tmp_path, caplog):
    """Without --seed the run draws one; the card must say which (it said `None`), and it must be the logged one."""
    argv = train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "out", "--objective", "vanilla", steps=1)
    seed_at = argv.index("--seed")
    del argv[seed_at : seed_at + 2]
    with caplog.at_level("INFO"):
        run_in_process(argv)
    drawn = int(
        next(r.getMessage() for r in caplog.records if "this run uses seed" in r.getMessage()).split()[-1][
            :-1
        ]
    )
    assert f"| seed | {drawn} |" in (tmp_path / "out" / "README.md").read_text()
