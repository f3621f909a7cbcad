"""Durable checkpoint folders and the run record that lets a resume check it continues the same run.

`train_pogdiff.py` saves the training state with `accelerator.save_state` into `.tmp-checkpoint-N`, then:

1. `write_run_record`: `pogdiff_run.json` with the run's settings (`run_settings`) and every file's size;
2. `fsync_tree`: every file and folder of it reaches the disk;
3. rename to `checkpoint-N` (atomic), `fsync_dir` on the output folder;
4. `prune_checkpoints`: only now are checkpoints beyond `--checkpoints_total_limit` removed.

So a kill at any instant leaves every checkpoint that was complete before, and `checkpoint_problem` tells a
complete folder from a damaged one (missing or truncated files) without loading it. accelerate's own
`total_limit` removes old checkpoints *before* writing the new one, hence this module.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zipfile
from typing import Any

from safetensors import SafetensorError, safe_open

from pogdiff.arguments import add_index_arguments

CHECKPOINT_PREFIX = "checkpoint-"
# Everything under this prefix is unfinished (a save in progress, or a removal): never resumed from.
TEMP_PREFIX = ".tmp-checkpoint-"
RUN_RECORD = "pogdiff_run.json"
RUN_RECORD_FORMAT = 1

# Flags whose change makes a resumed run differ from the uninterrupted one, besides every flag of
# `add_index_arguments` (neighbours, psi, text density). Flags that only say where, how often or how loudly
# (output_dir, logging, checkpointing_steps, max_train_steps, validation, report_to, dataloader workers, hub)
# are left out on purpose: changing them is what a resume is for.
EXACTNESS_FLAGS: tuple[str, ...] = (
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "non_ema_revision",
    "prediction_type",
    "image_column",
    "caption_column",
    "identity_column",
    "resolution",
    "center_crop",
    "random_flip",
    "image_interpolation_mode",
    "cache_latents",
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "input_perturbation",
    "noise_offset",
    "snr_gamma",
    "dream_training",
    "dream_detail_preservation",
    "learning_rate",
    "scale_lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "use_8bit_adam",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
    "mixed_precision",
    "allow_tf32",
    "enable_xformers_memory_efficient_attention",
    "use_ema",
    "use_lora",
    "rank",
    "lora_alpha",
    "lora_target_modules",
    "objective",
    "neighbor_grad",
    "caption_dropout_prob",
    "sampling",
    "sampling_power",
    "sampling_weight_column",
    "cbdm_tau",
    "cbdm_gamma",
)
# Of those, the ones the optimizer's state holds (param_groups, the LR scheduler's base_lrs): a resumed run
# keeps the checkpoint's values whatever the flags say.
RESTORED_FROM_CHECKPOINT: frozenset[str] = frozenset(
    {"--learning_rate", "--scale_lr", "--adam_beta1", "--adam_beta2", "--adam_weight_decay", "--adam_epsilon"}
)
DATA_KEY = "data_fingerprint"
PROCESSES_KEY = "num_processes"


def base_model_reference(name_or_path: str) -> str:
    """How a run names its base (model card, run record): a local folder by its absolute path (a relative one
    stops resolving as soon as the result is used from another directory), a Hub id as given."""
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def checkpoint_step(name: str) -> int | None:
    """N of a `checkpoint-N` folder name, or None for any other name."""
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    step = name[len(CHECKPOINT_PREFIX) :]
    return int(step) if step.isdigit() else None


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Finished `checkpoint-N` folder names in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if checkpoint_step(d) is not None]
    return sorted(names, key=checkpoint_step)


def temp_checkpoint_dirs(output_dir: str) -> list[str]:
    """Unfinished `.tmp-checkpoint-*` folders left in `output_dir` by an interrupted save or removal."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(d for d in os.listdir(output_dir) if d.startswith(TEMP_PREFIX))


def index_flag_dests() -> list[str]:
    """The destinations of `add_index_arguments`' flags, read from the parser so that a new flag is included."""
    parser = argparse.ArgumentParser(add_help=False)
    add_index_arguments(parser)
    return [action.dest for action in parser._actions]


def run_settings(
    args: argparse.Namespace, *, seed: int, data_fingerprint: str, num_processes: int
) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint to continue it exactly.

    Keys are the flags as typed (`--seed`), plus the data fingerprint and the number of processes. `seed` is
    the seed in use (drawn when `--seed` was not given). Values are JSON-normalised (as read back from disk).
    """
    settings: dict[str, Any] = {}
    for dest in (*EXACTNESS_FLAGS, *index_flag_dests()):
        settings[f"--{dest}"] = getattr(args, dest)
    settings["--seed"] = seed
    model = settings["--pretrained_model_name_or_path"]
    if isinstance(model, str):
        # The same local model reached from another working directory is the same model.
        settings["--pretrained_model_name_or_path"] = base_model_reference(model)
    settings[DATA_KEY] = data_fingerprint
    settings[PROCESSES_KEY] = num_processes
    return json.loads(json.dumps(settings))


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose values differ, in `current`'s order.

    Only keys both sides know are compared: a setting added to the script after the checkpoint was written
    has no recorded value to disagree with.
    """
    return [key for key in current if key in saved and saved[key] != current[key]]


def describe_differences(keys: list[str], saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The differences as one phrase, e.g. "--train_batch_size: 4 in the checkpoint, 2 now; ..."."""
    phrases = []
    for key in keys:
        if key == DATA_KEY:
            what = "the training data (--train_data_dir / --dataset_name, --max_train_samples): fingerprint"
        elif key == PROCESSES_KEY:
            what = "the number of processes:"
        else:
            what = f"{key}:"
        phrases.append(f"{what} {saved[key]} in the checkpoint, {current[key]} now")
    return "; ".join(phrases)


def _files_with_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return sizes


def write_run_record(folder: str, global_step: int, settings: dict[str, Any]) -> None:
    """Write `pogdiff_run.json` into a just-saved checkpoint folder: the step, the settings, each file's size.

    Call it after everything else is in `folder`: the sizes are what `checkpoint_problem` checks against.
    """
    record = {
        "format": RUN_RECORD_FORMAT,
        "global_step": global_step,
        "settings": settings,
        "files": _files_with_sizes(folder),
    }
    with open(os.path.join(folder, RUN_RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)


def read_run_record(folder: str) -> dict[str, Any] | None:
    """The run record of a checkpoint folder, or None for a checkpoint written before records existed."""
    path = os.path.join(folder, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_problem(folder: str) -> str | None:
    """Why `folder` cannot be resumed from (naming the file), or None when it looks complete.

    Cheap, no tensor is loaded: every file the run record lists must exist with its recorded size, every
    `.safetensors` header must cover its file, and every torch-saved file (`.bin`, `.pkl`, `.pt`: zip archives)
    must have its central directory, which a truncated write loses.
    """
    record_path = os.path.join(folder, RUN_RECORD)
    try:
        record = read_run_record(folder)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{record_path} is not valid JSON ({e})"
    if record is not None:
        for rel, size in record.get("files", {}).items():
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                return f"{path} is missing"
            actual = os.path.getsize(path)
            if actual != size:
                return f"{path} has {actual} bytes, {size} when saved (truncated or overwritten)"
    for rel in sorted(_files_with_sizes(folder)):
        path = os.path.join(folder, rel)
        if rel.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except SafetensorError as e:
                return f"{path} is not a readable safetensors file ({e})"
        elif rel.endswith((".bin", ".pkl", ".pt")):
            try:
                with zipfile.ZipFile(path):
                    pass
            except zipfile.BadZipFile as e:
                return f"{path} is not a readable torch file ({e})"
    return None


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str) -> None:
    """Make a folder's entries (a rename into it, a new file) durable. A no-op where folders cannot be opened."""
    if os.name == "posix":
        _fsync_path(folder)


def fsync_tree(folder: str) -> None:
    """fsync every file under `folder`, then every folder bottom-up, so that a rename of `folder` published
    afterwards never points at data still in the page cache (a power loss would otherwise leave it empty)."""
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            _fsync_path(os.path.join(root, name))
        fsync_dir(root)


def remove_checkpoint(output_dir: str, name: str) -> None:
    """Remove a checkpoint folder by first renaming it to a temporary name, so that a kill during the (slow,
    non-atomic) removal leaves a folder `latest` ignores rather than a half-deleted `checkpoint-N`."""
    trash = os.path.join(output_dir, f"{TEMP_PREFIX}removing-{name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(os.path.join(output_dir, name), trash)
    shutil.rmtree(trash)


def prune_checkpoints(output_dir: str, limit: int, keep: str) -> list[str]:
    """Remove the oldest checkpoints until `limit` remain, never `keep` (the one just written); return them.

    Call only once `keep` is complete under its final name: then every instant leaves at least one checkpoint.
    """
    others = [name for name in checkpoint_dirs(output_dir) if name != keep]
    removed = others[: max(len(others) + 1 - limit, 0)]
    for name in removed:
        remove_checkpoint(output_dir, name)
    return removed
