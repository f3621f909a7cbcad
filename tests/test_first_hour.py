"""The first hour of a new user (issue 26): the README's commands as written, offline, on the tiny model.

Each tool's mistake is one line naming that tool's own flag, exit 2; sizes follow the model or the run; every
CLI reads a folder the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate_pogdiff
from pogdiff import checkpointing, features
from pogdiff import index as index_cli
from pogdiff.errors import UserError, report_user_errors
from pogdiff.testing import TINY_RESOLUTION, run_process_group
from tests.test_train import run_in_process, train_args

DEFAULT_ENCODER = "facebook/dinov2-base"


def one_error_line(capsys, prog: str, fn, *args) -> str:
    """Run `fn(*args)` the way the CLI does; it must exit 2 with one `<prog>: error:` line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(prog, fn, *args) if prog else fn(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Retrying" not in err
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    return line


def without(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


# ---------------------------------------------------------------------------------------------------------------
# 1. The default neighbour encoder offline: one line naming the tool's own flag, exit 2, no retries


def test_trainer_default_encoder_offline_names_neighbor_encoder(
    tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    argv = without(train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "o"), "--neighbor_encoder")
    line = one_error_line(capsys, None, run_in_process, argv)
    assert line.startswith(
        f"train_pogdiff.py: error: --neighbor_encoder '{DEFAULT_ENCODER}' is not a local folder"
    )
    assert "HF_HUB_OFFLINE is set" in line and "--neighbor_encoder vae" in line
    assert "--feature_extractor" not in line


def test_index_cli_default_encoder_offline_names_neighbor_encoder(
    tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    argv = [
        "--pretrained_model_name_or_path", tiny_sd_path,
        "--train_data_dir", tiny_dataset_path,
        "--num_neighbors", "3",
        "--output_dir", str(tmp_path / "index"),
    ]  # fmt: skip
    line = one_error_line(capsys, "python -m pogdiff.index", index_cli.main, argv)
    assert line.startswith(
        f"python -m pogdiff.index: error: --neighbor_encoder '{DEFAULT_ENCODER}' is not a local"
    )
    assert "--neighbor_encoder vae" in line and "--feature_extractor" not in line


def test_evaluate_default_extractor_offline_names_feature_extractor(
    tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    argv = [
        "--model", f"m={tiny_sd_path}",
        "--train_data_dir", tiny_dataset_path,
        "--images_per_identity", "1",
        "--output_dir", str(tmp_path / "eval"),
    ]  # fmt: skip
    line = one_error_line(capsys, "evaluate_pogdiff.py", evaluate_pogdiff.main, argv)
    assert line.startswith(
        f"evaluate_pogdiff.py: error: --feature_extractor '{DEFAULT_ENCODER}' is not a local"
    )
    assert "--feature_extractor pixels" in line and "--neighbor_encoder" not in line
    assert not (tmp_path / "eval" / "m").exists()  # decided before generating anything


def test_unreachable_hub_without_offline_mode_is_one_request(monkeypatch):
    """No network and no HF_HUB_OFFLINE: one HEAD request fails, no retries, one message."""
    import huggingface_hub.constants
    import huggingface_hub.utils

    requests = []

    class DeadSession:
        def head(self, url, **kwargs):
            requests.append(url)
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", DeadSession)
    with pytest.raises(features.HubModelUnavailableError) as error:
        features.check_hub_model_available(
            "pogdiff-tests/not-cached", "--neighbor_encoder", features.NEIGHBOR_ENCODER_OFFLINE_CHOICES
        )
    assert len(requests) == 1 and requests[0].endswith("/pogdiff-tests/not-cached/resolve/main/config.json")
    message = str(error.value)
    assert "the Hub cannot be reached (Name or service not known)" in message
    assert "--neighbor_encoder vae" in message and "\n" not in message


def test_local_folder_or_cached_model_passes_the_check(tmp_path):
    features.check_hub_model_available(str(tmp_path), "--feature_extractor", "x")  # no exception
    with pytest.raises(
        features.HubModelUnavailableError, match=r"--feature_extractor '\./missing': no such folder"
    ):
        features.check_hub_model_available("./missing", "--feature_extractor", "x")


# ---------------------------------------------------------------------------------------------------------------
# 2. Sizes follow the run or the model; --help shows every default


def test_evaluate_generates_at_the_models_size_without_resolution(tiny_sd_path, tiny_dataset_path, tmp_path):
    argv = [
        "--model", f"m={tiny_sd_path}",
        "--train_data_dir", tiny_dataset_path,
        "--images_per_identity", "1",
        "--num_inference_steps", "1",
        "--feature_extractor", "pixels",
        "--device", "cpu",
        "--output_dir", str(tmp_path / "eval"),
    ]  # fmt: skip
    report = evaluate_pogdiff.main(argv)
    assert (
        report["generation"]["resolution"] == TINY_RESOLUTION == checkpointing.native_resolution(tiny_sd_path)
    )
    assert report["few_shot_max"] == evaluate_pogdiff.DEFAULT_FEW_SHOT_MAX
    with Image.open(tmp_path / "eval" / "m" / "chen" / "000.png") as image:
        assert image.size == (TINY_RESOLUTION, TINY_RESOLUTION)


def _fake_run(folder, **settings):
    """A training output holding only its run record."""
    folder.mkdir(parents=True)
    record = {"format": 1, "global_step": 1, "settings": {f"--{k}": v for k, v in settings.items()}}
    (folder / "pogdiff_run.json").write_text(json.dumps(record))
    return str(folder)


def test_evaluate_takes_resolution_and_few_shot_max_from_the_run_record(tmp_path):
    first = _fake_run(tmp_path / "a", resolution=24, few_shot_max=3)
    args = argparse.Namespace(resolution=None, few_shot_max=None)
    evaluate_pogdiff.settings_from_models(args, {"a": first})
    assert (args.resolution, args.few_shot_max) == (24, 3)

    # A checkpoint's record counts when the output has none of its own (a run killed before its end).
    (tmp_path / "b" / "checkpoint-5").mkdir(parents=True)
    _fake_run(tmp_path / "b" / "checkpoint-9", resolution=48)
    assert checkpointing.training_resolution(str(tmp_path / "b"))[0] == 48

    # Flags given explicitly win; models trained at different sizes are not compared silently.
    args = argparse.Namespace(resolution=16, few_shot_max=1)
    evaluate_pogdiff.settings_from_models(args, {"a": first, "b": str(tmp_path / "b")})
    assert (args.resolution, args.few_shot_max) == (16, 1)
    with pytest.raises(UserError, match=r"different resolutions \(a 24 px, b 48 px\); pass --resolution"):
        evaluate_pogdiff.settings_from_models(argparse.Namespace(resolution=None, few_shot_max=None),
                                              {"a": first, "b": str(tmp_path / "b")})  # fmt: skip
    # A model folder whose configs cannot be read asks for --resolution; a missing one is named as loading would.
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="could not tell the size to generate at .*; pass --resolution"):
        evaluate_pogdiff.settings_from_models(
            argparse.Namespace(resolution=None, few_shot_max=None), {"x": str(tmp_path / "lora")}
        )
    with pytest.raises(UserError, match=r"^--model x: '.*/missing': no such folder\.$"):
        evaluate_pogdiff.settings_from_models(
            argparse.Namespace(resolution=None, few_shot_max=None), {"x": str(tmp_path / "missing")}
        )


def test_index_cli_builds_the_trainers_index_from_the_run(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    """`--from_run` gives the trainer's cache key (resolution, seed, every index flag); without it the
    resolution is the model's size, not 512."""
    out = tmp_path / "run"
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, out, "--seed", "7", "--psi_a2", "3", steps=1))
    (trained,) = [p.name for p in out.iterdir() if p.name.startswith("pogdiff-index-")]
    assert json.loads((out / "pogdiff_run.json").read_text())["settings"]["--resolution"] == 32

    summary = index_cli.main(
        ["--from_run", str(out), "--train_data_dir", tiny_dataset_path, "--output_dir", str(tmp_path / "i")]
    )
    assert [p.name for p in (tmp_path / "i").iterdir() if p.name.startswith("pogdiff-index-")] == [trained]
    assert summary["psi_params"]["a2"] == 3.0 and summary["num_neighbors"] == 3

    args = index_cli.parse_args(
        [
            "--pretrained_model_name_or_path",
            tiny_sd_path,
            "--train_data_dir",
            tiny_dataset_path,
            "--output_dir",
            "x",
        ]
    )
    assert args.resolution == TINY_RESOLUTION and args.seed == 0
    line = one_error_line(
        capsys, "python -m pogdiff.index", index_cli.main,
        ["--from_run", str(tmp_path), "--train_data_dir", tiny_dataset_path, "--output_dir", "x"],
    )  # fmt: skip
    assert f"--from_run {str(tmp_path)!r} holds no pogdiff_run.json" in line


def option_blocks(help_text: str) -> dict[str, str]:
    """`--flag` -> its help text, from argparse's --help output."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        match = re.match(r"^  (-{1,2}[\w-]+)", line)
        if match:
            current = match[1]
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def help_of(fn, argv) -> str:
    stdout = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(stdout):
        fn(argv)
    assert exit_info.value.code == 0
    return stdout.getvalue()


def test_help_shows_every_default_and_readable_choices():
    import train_pogdiff

    index_help = help_of(index_cli.parse_args, ["--help"])
    assert index_help.startswith("usage: python -m pogdiff.index")
    trainer_help = help_of(train_pogdiff.parse_args, ["--help"])
    pogdiff_group = trainer_help[trainer_help.index("PoGDiff (flags that") :]
    for text in (index_help, help_of(evaluate_pogdiff.parse_args, ["--help"]), pogdiff_group):
        blocks = option_blocks(text)
        assert "--psi_terms" in blocks or "--feature_extractor" in blocks
        missing = [flag for flag, block in blocks.items() if flag != "-h" and "default" not in block.lower()]
        assert not missing, missing
    assert "--psi_terms TERMS" in index_help and "{img,txt,txt,img" not in index_help + trainer_help


# ---------------------------------------------------------------------------------------------------------------
# 3. A kohya folder means the same to every tool


def kohya_folder(root) -> str:
    """10_carol (3 images, repeats 10) and bob (2 images), each with a .txt caption beside it."""
    for folder, name, count in (("10_carol", "carol", 3), ("bob", "bob", 2)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.new(
                "RGB", (TINY_RESOLUTION, TINY_RESOLUTION), (80 * i, 120, 200 if name == "bob" else 0)
            ).save(root / folder / f"{i}.png")
            (root / folder / f"{i}.txt").write_text(f"{name} photo {i}\n")
    return str(root)


def test_evaluate_reads_a_kohya_folder_like_the_trainer(tiny_sd_path, tmp_path):
    data = kohya_folder(tmp_path / "kohya")
    common = [
        "--model", f"m={tiny_sd_path}", "--train_data_dir", data, "--caption_extension", ".txt",
        "--images_per_identity", "1", "--num_inference_steps", "1", "--feature_extractor", "pixels",
        "--few_shot_max", "2", "--device", "cpu",
    ]  # fmt: skip
    report = evaluate_pogdiff.main([*common, "--output_dir", str(tmp_path / "e1")])
    assert sorted(report["identities"]) == ["bob", "carol"]
    assert report["identities"]["carol"]["prompt"] == "An image of carol."
    assert report["identities"]["carol"]["n_train"] == 3 and report["split"]["few"] == ["bob"]
    # The captions are the .txt files' text.
    report = evaluate_pogdiff.main(
        [*common, "--prompt_from", "caption", "--output_dir", str(tmp_path / "e2")]
    )
    assert report["identities"]["bob"]["prompt"] == "bob photo 0"


def test_a_kohya_folder_without_caption_extension_names_the_flag(tiny_sd_path, tmp_path, capsys):
    data = kohya_folder(tmp_path / "kohya")
    expected = (
        f"{data!r} is a kohya-style folder (captions in .txt files beside the images, no metadata.jsonl): "
    )
    expected += "pass --caption_extension .txt to read its captions and identities."

    argv = train_args(tiny_sd_path, data, tmp_path / "o", "--num_neighbors", "2")
    assert one_error_line(capsys, None, run_in_process, argv) == f"train_pogdiff.py: error: {expected}"
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd_path,
        "--train_data_dir",
        data,
        "--output_dir",
        str(tmp_path),
    ]
    line = one_error_line(capsys, "python -m pogdiff.index", index_cli.main, argv)
    assert line == f"python -m pogdiff.index: error: {expected}"
    argv = ["--model", f"m={tiny_sd_path}", "--train_data_dir", data, "--output_dir", str(tmp_path / "e")]
    line = one_error_line(capsys, "evaluate_pogdiff.py", evaluate_pogdiff.main, argv)
    assert line == f"evaluate_pogdiff.py: error: {expected}"


# ---------------------------------------------------------------------------------------------------------------
# 7. Validation grids: guidance adjustable and stated


@pytest.mark.parametrize("given, expected_call, expected_title", [
    (None, None, "guidance 7.5 (the pipeline's default)"),
    ("2", 2.0, "guidance 2"),
])  # fmt: skip
def test_validation_guidance_scale_is_used_and_stated(
    given, expected_call, expected_title, tiny_sd_path, tiny_dataset_path, tmp_path, monkeypatch
):
    import train_pogdiff
    from pipeline_pogdiff import PoGDiffPipeline

    calls, titles = [], []
    original_call, original_grid = PoGDiffPipeline.__call__, train_pogdiff.validation_grid

    @functools.wraps(original_call)  # keeps the signature, whose default guidance the title states
    def spy_call(self, *args, **kwargs):
        calls.append(kwargs.get("guidance_scale"))
        return original_call(self, *args, **kwargs)

    def spy_grid(*args, **kwargs):
        titles.append(kwargs["title"])
        return original_grid(*args, **kwargs)

    monkeypatch.setattr(PoGDiffPipeline, "__call__", spy_call)
    monkeypatch.setattr(train_pogdiff, "validation_grid", spy_grid)
    extra = ["--objective", "vanilla", "--validation_prompts", "An image of chen.", "--validation_steps", "1",
             "--num_validation_inference_steps", "1"]  # fmt: skip
    if given is not None:
        extra += ["--validation_guidance_scale", given]
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "o", *extra, steps=1))
    assert calls and set(calls) == {expected_call}
    assert titles and set(titles) == {f"step 1, {expected_title}, 1 DDIM steps"}


def test_validation_guidance_scale_must_be_a_number_at_least_zero(capsys):
    import train_pogdiff

    with pytest.raises(SystemExit) as exit_info:
        train_pogdiff.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                  "--validation_guidance_scale", "-1"])  # fmt: skip
    assert exit_info.value.code == 2
    assert (
        "argument --validation_guidance_scale: must be a finite number >= 0, got '-1'"
        in capsys.readouterr().err
    )


# ---------------------------------------------------------------------------------------------------------------
# 4. The README's commands are the tests' commands
#
# Every fenced bash command of README.md is either run here, from a folder that looks like the repository root
# (symlinks to the scripts and the package), offline, on the tiny model, or skipped for a stated reason. The only
# changes are these documented substitutions: the Hub model -> the tiny model and its 32 px; the default neighbour
# encoder / feature extractor (DINOv2, a Hub id) -> the offline `vae` / `pixels`; sizes (steps, identities,
# images) -> small ones; bf16 -> no mixed precision (CPU). A README command that is neither run nor skipped fails
# the test, so a new command gets checked.

REPO = Path(__file__).resolve().parent.parent

SKIPPED_README_COMMANDS = {
    "pip install": "installs packages (needs the network)",
    "python examples/demo_digits.py": "the demo (6 minutes); tests/test_demo.py runs its --quick size",
    "python -m pytest": "the test command itself",
    "accelerate launch --config_file examples/accelerate/": "a multi-GPU sketch with elided flags (...); "
    "tests/test_sharded.py runs examples/accelerate/fsdp.yaml on 2 CPU processes",
    "torchrun --nproc_per_node 8": "a multi-GPU sketch with elided flags (...)",
    "python examples/study/run_study.py": "the study (1.5 hours); tests/test_study.py runs its ci size",
    "python benchmarks/": "benchmarks (minutes); tests/test_benchmarks.py runs them at a small size",
}

# (command prefix, [(text as in the README, substitute)], appended flags), in README order.
RUN_README_COMMANDS = [
    ("python -m pogdiff.data build", [
        ("--majority_ids 10", "--majority_ids 2"), ("--majority_images 30", "--majority_images 6"),
        ("--minority_ids 40", "--minority_ids 3"),
    ], []),
    ("accelerate launch --quiet train_pogdiff.py", [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "{tiny_sd}"), ("--resolution 512", "--resolution 32"),
        ("--max_train_steps 12000", "--max_train_steps 2"), ("--mixed_precision bf16", "--mixed_precision no"),
        ("--checkpointing_steps 1000", "--checkpointing_steps 1"),
        ("--train_batch_size 8 --gradient_accumulation_steps 4", "--train_batch_size 4 --gradient_accumulation_steps 1"),
    ], ["--neighbor_encoder", "vae", "--density_epochs", "5", "--num_validation_inference_steps", "5"]),
    ("python -m pogdiff.index --from_run", [], []),
    ("accelerate launch --quiet train_pogdiff.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0", [
        ("stabilityai/stable-diffusion-xl-base-1.0", "{tiny_sdxl}"), ("--resolution 1024", "--resolution 32"),
        ("--max_train_steps 12000", "--max_train_steps 2"), ("--mixed_precision bf16", "--mixed_precision no"),
        ("--checkpointing_steps 1000", "--checkpointing_steps 1"),
        ("--train_batch_size 1 --gradient_accumulation_steps 8", "--train_batch_size 4 --gradient_accumulation_steps 1"),
    ], ["--neighbor_encoder", "vae", "--density_epochs", "5", "--num_validation_inference_steps", "5"]),
    ("python evaluate_pogdiff.py", [
        # vanilla-model is the same training command with --objective vanilla: the run above stands in for it.
        ("vanilla=vanilla-model", "vanilla=pogdiff-model"), ("--images_per_identity 20", "--images_per_identity 2"),
    ], ["--feature_extractor", "pixels", "--num_inference_steps", "5"]),
]  # fmt: skip


def readme_commands() -> list[str]:
    """Every command of README.md's ```bash blocks, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def photo_folder(root: Path) -> None:
    """An identity-per-folder photo collection for `--image_dir photos/`: 2 people with 8 photos, 3 with 4."""
    rng = np.random.default_rng(0)
    for k, count in enumerate([8, 8, 4, 4, 4]):
        folder = root / f"person{k}"
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = np.clip(rng.normal(40 * k + 20, 30, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.long(seconds=61)
def test_every_readme_command_runs_offline_or_is_skipped_for_a_reason(tiny_sd_path, tiny_sdxl_path, tmp_path):
    commands = readme_commands()
    plan = []
    for command in commands:
        skipped = [reason for prefix, reason in SKIPPED_README_COMMANDS.items() if command.startswith(prefix)]
        runs = [entry for entry in RUN_README_COMMANDS if command.startswith(entry[0])]
        # The most specific prefix decides (the SDXL command starts like the SD one).
        runs = sorted(runs, key=lambda entry: len(entry[0]))[-1:]
        assert len(skipped) + len(runs) == 1, (
            f"README command neither run nor skipped by this test: {command}"
        )
        if runs:
            prefix, substitutions, extra = runs[0]
            for old, new in substitutions:
                assert old in command, f"the README no longer has {old!r} in: {command}"
                command = command.replace(old, new.format(tiny_sd=tiny_sd_path, tiny_sdxl=tiny_sdxl_path))
            plan.append(shlex.split(command) + extra)
    # Each command to run is in the README once, in this order.
    prefixes = [
        shlex.split(functools.reduce(lambda text, sub: text.replace(*sub), subs, prefix))
        for prefix, subs, _ in RUN_README_COMMANDS
    ]
    prefixes = [
        [w.format(tiny_sd=tiny_sd_path, tiny_sdxl=tiny_sdxl_path) for w in words] for words in prefixes
    ]
    assert [words[: len(prefix)] for words, prefix in zip(plan, prefixes)] == prefixes and len(plan) == len(
        prefixes
    )

    # The README's LoRA advice, applied to its training command, is a valid command line (parsed, not run).
    import train_pogdiff

    train = plan[1]  # the SD training command
    assert (
        "--use_ema" in train
        and "Replace `--use_ema` by `--use_lora --rank 16`" in (REPO / "README.md").read_text()
    )
    lora = [word for word in train[4:] if word != "--use_ema"] + ["--use_lora", "--rank", "16"]
    assert train_pogdiff.parse_args(lora).use_lora

    # A folder that looks like the repository root, as the README's commands assume.
    root = tmp_path / "clone"
    root.mkdir()
    for name in ("train_pogdiff.py", "evaluate_pogdiff.py", "pipeline_pogdiff.py", "pogdiff"):
        (root / name).symlink_to(REPO / name)
    photo_folder(root / "photos")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    log = []
    for words in plan:
        started = time.perf_counter()
        done = run_process_group(words, timeout=600, cwd=root, env=env)
        seconds = time.perf_counter() - started
        last = (done.stdout.strip().splitlines() or done.stderr.strip().splitlines() or [""])[-1]
        log.append(f"exit {done.returncode} | {seconds:.0f} s | {last[:100]} | {shlex.join(words)[:120]}")
        assert done.returncode == 0, f"{shlex.join(words)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    print("\n".join(log))
    # What each command promised: the dataset, the model with its run record, the index, the evaluation.
    assert (root / "data" / "my-it2i" / "metadata.jsonl").is_file()
    assert (
        json.loads((root / "pogdiff-model" / "pogdiff_run.json").read_text())["settings"]["--resolution"]
        == 32
    )
    # The SDXL command (only the model id and resolution changed) trained SDXL LoRA adapters.
    assert (root / "pogdiff-sdxl-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "stable-diffusion-xl" in (root / "pogdiff-sdxl-lora" / "README.md").read_text()
    assert (root / "index-out" / "index_summary.json").is_file()
    report = json.loads((root / "eval" / "metrics.json").read_text())
    assert report["generation"]["resolution"] == 32 and set(report["models"]) == {"vanilla", "pogdiff"}


# ---------------------------------------------------------------------------------------------------------------
# 6. No alarming torchvision notice at start; other transformers messages still pass


def test_tools_start_without_the_torchvision_notice_and_other_warnings_pass(caplog):
    done = run_process_group([sys.executable, "train_pogdiff.py", "--help"], timeout=300, cwd=REPO)
    assert done.returncode == 0 and "PoGDiff (flags" in done.stdout
    assert "torchvision" not in done.stderr, done.stderr[-2000:]

    import logging

    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `...Pil` ..."
        )
        logger.warning("`Foo` requires some other backend.")
    assert [record.getMessage() for record in caplog.records] == ["`Foo` requires some other backend."]


def test_demo_stages_report_their_progress_bars(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import demo_digits
    finally:
        sys.path.remove(str(REPO / "examples"))
    monkeypatch.setattr(demo_digits, "PROGRESS_EVERY_S", 0.0)
    script = "from tqdm import tqdm\nfor _ in tqdm(range(3), desc='Steps'): pass\nprint('INFO 1/2 not a bar')"
    demo_digits.run_logged([sys.executable, "-c", script], tmp_path / "train_x.log", False, "pogdiff")
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "  pogdiff: Steps 3/3" and len(lines) == len(set(lines)) >= 2
    assert "INFO 1/2 not a bar" in (tmp_path / "train_x.log").read_text()  # everything still goes to the log


# ---------------------------------------------------------------------------------------------------------------
# 8. Pictures that say what they show


def test_evaluation_grid_labels_and_groups():
    groups = [("train", 2), ("vanilla", 3), ("pogdiff", 3)]
    assert evaluate_pogdiff.few_shot_grid_columns(groups) == ["train", ""] + ["vanilla", "", ""] + [
        "pogdiff",
        "",
        "",
    ]
    a = Image.new("RGB", (4, 4))
    row = evaluate_pogdiff.few_shot_grid_row(groups, {"train": [a], "vanilla": [a] * 5, "pogdiff": [a] * 3})
    assert row == [a, None, a, a, a, a, a, a]  # one training image: its second column stays empty
    assert evaluate_pogdiff.identity_grid_title("chen", 2, True) == "chen: 2 training images (few-shot)"
    assert evaluate_pogdiff.identity_grid_title("alice", 1, False) == "alice: 1 training image (majority)"


def test_notebook_labels_each_validation_step_once():
    notebook = json.loads((REPO / "examples" / "quickstart.ipynb").read_text(encoding="utf-8"))
    (cell,) = [
        c
        for c in notebook["cells"]
        if c["cell_type"] == "code" and "validation_over_training.png" in "".join(c["source"])
    ]
    # The grids carry their own "step N, guidance ..." title; the figure adds no second one.
    assert 'set_title(f"step {step}"' not in "".join(cell["source"])
