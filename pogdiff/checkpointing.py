"""Durable checkpoint folders and the run record that lets a resume check it continues the same run.

`train_pogdiff.py` saves the training state with `accelerator.save_state` into `.tmp-checkpoint-N`, then:

1. `write_run_record`: `pogdiff_run.json` with the run's settings (`run_settings`), every file's size and its
   SHA-256 (read back right after the save, files hashed in parallel);
2. `fsync_tree`: every file and folder of it reaches the disk;
3. rename to `checkpoint-N` (atomic), `fsync_dir` on the output folder;
4. `prune_checkpoints`: only now are checkpoints beyond `--checkpoints_total_limit` removed.

So a kill at any instant leaves every checkpoint that was complete before, and `checkpoint_problem` tells a
complete folder from a damaged one (missing, truncated or same-size corrupted files) without loading it. accelerate's own
`total_limit` removes old checkpoints *before* writing the new one, hence this module.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from accelerate.logging import get_logger
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open

from pogdiff.arguments import add_index_arguments
from pogdiff.errors import UserError, disk_full_is_a_user_error
from pogdiff.settings import exact_dests, restored_flags, values_of

logger = get_logger(__name__, log_level="INFO")

CHECKPOINT_PREFIX = "checkpoint-"
# Everything under this prefix is unfinished (a save in progress, or a removal): never resumed from.
TEMP_PREFIX = ".tmp-checkpoint-"
RUN_RECORD = "pogdiff_run.json"
RUN_RECORD_FORMAT = 1


def index_flag_dests() -> list[str]:
    """The destinations of `add_index_arguments`' flags, read from the parser so that a new flag is included."""
    parser = argparse.ArgumentParser(add_help=False)
    add_index_arguments(parser)
    return [action.dest for action in parser._actions]


# Flags whose change makes a resumed run differ from the uninterrupted one are declared `exact` (`pogdiff.settings`,
# `pogdiff.arguments.add`). EXACTNESS_FLAGS are those beyond the flags of `add_index_arguments` (neighbours, psi,
# text density), which are all exact; `run_settings` reads the declarations when called.
EXACTNESS_FLAGS: tuple[str, ...] = tuple(
    dest for dest in exact_dests() if dest not in set(index_flag_dests())
)
# Of those, the ones the optimizer's state holds (param_groups, the LR scheduler's base_lrs): a resumed run
# keeps the checkpoint's values whatever the flags say.
RESTORED_FROM_CHECKPOINT: frozenset[str] = restored_flags()
DATA_KEY = "data_fingerprint"
BASE_MODEL_KEY = "base_model_fingerprint"
PROCESSES_KEY = "num_processes"


def base_model_reference(name_or_path: str) -> str:
    """How a run names its base (model card, run record): a local folder by its absolute path (a relative one
    stops resolving as soon as the result is used from another directory), a Hub id as given."""
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


# Files of a base model up to this size (configs, tokenizer files, model_index.json) are hashed in full; larger
# ones (weights) by size and modification time, see `base_model_fingerprint`.
FULLY_HASHED_MODEL_FILE_BYTES = 16 << 20


def _model_folder_files(folder: str) -> list[str]:
    """The files of a local model that loading reads: model_index.json and the component folders it names
    (a training output's checkpoints and logs beside them are not the model), else every file; hidden ones
    (.cache, .git) never. Relative, "/"-separated, sorted."""
    index_path = os.path.join(folder, "model_index.json")
    roots = [folder]
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                components = [key for key in json.load(f) if not key.startswith("_")]
            roots = [
                os.path.join(folder, name) for name in components if os.path.isdir(os.path.join(folder, name))
            ]
        except (OSError, ValueError, AttributeError):
            roots = [folder]
    files = {"model_index.json"} if os.path.isfile(index_path) else set()
    for root in roots:
        for dirpath, dirnames, names in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in names:
                if not name.startswith("."):
                    files.add(os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/"))
    return sorted(files)


def base_model_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """What identifies the base model's content, for the run record and the index cache key.

    A local folder: a SHA-256 over its model files (`_model_folder_files`): each file's relative name, and
    its content's SHA-256 for files up to `FULLY_HASHED_MODEL_FILE_BYTES` (configs, tokenizer), its size and
    modification time (ns) for larger ones (weights). So the folder reached by another path is the same base,
    and a rewrite in place (save_pretrained, a download, a copy over it) is another. Weights are not hashed in
    full because a Stable Diffusion folder with its variants holds 5-20 GB, read at every start and resume; the
    price is that a copy of the folder that does not keep modification times (`cp -r`, not `cp -a`) counts as
    changed. A Hub id: the commit of `revision` (default main) that huggingface_hub's cache resolves it to,
    offline; the id and revision as given when the cache does not know it.
    """
    if os.path.isdir(name_or_path):
        files = _model_folder_files(name_or_path)
        small, large = [], {}
        for rel in files:
            stat = os.stat(os.path.join(name_or_path, rel))
            if stat.st_size <= FULLY_HASHED_MODEL_FILE_BYTES:
                small.append(rel)
            else:
                large[rel] = f"size {stat.st_size}, mtime_ns {stat.st_mtime_ns}"
        entries = {**_hashes(name_or_path, small), **large}
        payload = json.dumps(entries, sort_keys=True).encode()
        return f"folder-sha256:{hashlib.sha256(payload).hexdigest()[:16]}"
    commit = None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "model_index.json", revision=revision)
        if isinstance(cached, str):
            commit = os.path.basename(os.path.dirname(cached))  # .../snapshots/<commit>/model_index.json
    except (ValueError, OSError):  # not a valid repo id (HFValidationError is a ValueError)
        commit = None
    return f"hub:{name_or_path}@{commit or revision or 'main'}"


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


def run_settings(
    args: argparse.Namespace | Mapping[str, Any],
    *,
    seed: int,
    data_fingerprint: str,
    num_processes: int,
    base_model: str | None = None,
) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint to continue it exactly: every flag
    declared `exact` (`pogdiff.settings.exact_dests`), from `args` (the parsed flags, or a mapping of them).

    Keys are the flags as typed (`--seed`), plus the data fingerprint, the base model's fingerprint
    (`base_model_fingerprint`, when given) and the number of processes. `seed` is the seed in use (drawn when
    `--seed` was not given). Values are JSON-normalised (as read back from disk).
    """
    values = values_of(args)
    record: dict[str, Any] = {f"--{dest}": values[dest] for dest in exact_dests()}
    record["--seed"] = seed
    model = record["--pretrained_model_name_or_path"]
    if isinstance(model, str):
        # The same local model reached from another working directory is the same model.
        record["--pretrained_model_name_or_path"] = base_model_reference(model)
    record[DATA_KEY] = data_fingerprint
    if base_model is not None:
        record[BASE_MODEL_KEY] = base_model
    record[PROCESSES_KEY] = num_processes
    return json.loads(json.dumps(record))


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose values differ, in `current`'s order.

    Only keys both sides know are compared: a setting added to the script after the checkpoint was written
    has no recorded value to disagree with. Likewise a data fingerprint of the older, path-based format
    (`datasets`' 16-hex-digit `_fingerprint`; today's is a 64-digit SHA-256 of the content) is not compared.
    """
    return [
        key
        for key in current
        if key in saved and saved[key] != current[key] and not _older_data_fingerprint(key, saved, current)
    ]


def _older_data_fingerprint(key: str, saved: dict[str, Any], current: dict[str, Any]) -> bool:
    return (
        key == DATA_KEY
        and isinstance(saved[key], str)
        and isinstance(current[key], str)
        and len(saved[key]) != len(current[key])
    )


def describe_differences(keys: list[str], saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The differences as one phrase, e.g. "--train_batch_size: 4 in the checkpoint, 2 now; ..."."""
    phrases = []
    for key in keys:
        if key == DATA_KEY:
            what = "the training data (--train_data_dir / --dataset_name, --max_train_samples): fingerprint"
        elif key == BASE_MODEL_KEY:
            what = (
                f"the base model --pretrained_model_name_or_path {current.get('--pretrained_model_name_or_path')} "
                "(rewritten in place, or another revision):"
            )
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


HASH_KEY = "sha256"
_HASH_CHUNK = 8 << 20


def file_sha256(path: str) -> str:
    """The SHA-256 of a file, streamed in 8 MiB chunks (hashlib releases the GIL on them: threads overlap)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hashes(folder: str, rels: list[str]) -> dict[str, str]:
    paths = [os.path.join(folder, rel) for rel in rels]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
        return dict(zip(rels, pool.map(file_sha256, paths)))


def write_run_record(folder: str, global_step: int, settings: dict[str, Any]) -> None:
    """Write `pogdiff_run.json` into a just-saved checkpoint folder: the step, the settings, each file's size
    and SHA-256.

    Call it after everything else is in `folder`: sizes and hashes are what `checkpoint_problem` checks. The
    size alone misses same-size damage (a bad sector, a stray write), which would otherwise be resumed from.
    """
    files = _files_with_sizes(folder)
    record = {
        "format": RUN_RECORD_FORMAT,
        "global_step": global_step,
        "settings": settings,
        "files": files,
        HASH_KEY: _hashes(folder, sorted(files)),
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

    No tensor is loaded: every file the run record lists must exist with its recorded size and (for records
    that have them) its recorded SHA-256, every `.safetensors` header must cover its file, and every
    torch-saved file (`.bin`, `.pkl`, `.pt`: zip archives) must have its central directory, which a truncated
    write loses. Hashing reads the checkpoint once, at disk speed.
    """
    record_path = os.path.join(folder, RUN_RECORD)
    try:
        record = read_run_record(folder)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{record_path} is not valid JSON ({e})"
    if record is not None:
        if not (
            isinstance(record, dict)
            and isinstance(record.get("settings"), dict)
            and isinstance(record.get("files"), dict)
            and isinstance(record.get(HASH_KEY, {}), dict)
        ):
            return f"{record_path} is not a run record train_pogdiff.py wrote (no settings or file list)"
        for rel, size in record["files"].items():
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                return f"{path} is missing"
            actual = os.path.getsize(path)
            if actual != size:
                return f"{path} has {actual} bytes, {size} when saved (truncated or overwritten)"
        # Checkpoints written before hashes were recorded have none: their sizes are all there is to check.
        saved = record.get(HASH_KEY, {})
        for rel in saved:
            if not os.path.isfile(os.path.join(folder, rel)):
                return f"{os.path.join(folder, rel)} is missing"
        for rel, digest in _hashes(folder, sorted(saved)).items():
            if digest != saved[rel]:
                return (
                    f"{os.path.join(folder, rel)} does not match the SHA-256 recorded when it was saved "
                    "(same size, other content: corrupted or overwritten)"
                )
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


# Used by train_pogdiff.py's loop: the output folder's lock, saving, choosing and checking a resume.


OUTPUT_LOCK = ".pogdiff-train.lock"


def lock_output_dir(output_dir: str) -> FileLock:
    """Takes `output_dir`'s lock for this run, or fails at once naming the lock if another run holds it.

    The lock is an OS file lock: a run that dies (even by kill -9) releases it, so it never needs cleaning.
    """
    lock = FileLock(os.path.join(output_dir, OUTPUT_LOCK))
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock.acquire(timeout=0)
    except (NotADirectoryError, FileExistsError, PermissionError) as error:
        # A path under a file, or a folder this user cannot write: say which, before any model is loaded.
        raise UserError(
            f"--output_dir {output_dir!r} cannot be used: {error.strerror} ({error.filename}). Give a folder you "
            "can write to."
        ) from None
    except Timeout:
        raise UserError(
            f"Another train_pogdiff.py run is using --output_dir {output_dir!r} (it holds "
            f"{os.path.join(output_dir, OUTPUT_LOCK)}). Wait for it to finish, or give this run another --output_dir."
        ) from None
    return lock


def describe_output_dir_run(output_dir: str, names: list[str]) -> str:
    """The run whose checkpoints `names` are, in a phrase: "checkpoint-1, checkpoint-2; the newest is step 2 of
    an --objective vanilla run with --seed 0". Never fails: a missing or unreadable record is said as such."""
    newest = names[-1]
    try:
        record = read_run_record(os.path.join(output_dir, newest))
    except (OSError, ValueError):
        record = None
    settings = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(settings, dict):
        return f"{', '.join(names)}; the newest, {newest}, has no readable {RUN_RECORD}"
    return (
        f"{', '.join(names)}; the newest is step {checkpoint_step(newest)} of an --objective "
        f"{settings.get('--objective')} run with --seed {settings.get('--seed')}"
    )


def claim_output_dir_for_new_run(output_dir: str, overwrite: bool, is_main_process: bool) -> None:
    """A new run (no --resume_from_checkpoint) starts only in an output folder without another run's checkpoints.

    Otherwise its checkpoint-N would replace the other run's, rotation would prune the rest, and `latest` would
    later resume a mix of both runs. With `overwrite` (--overwrite_output_dir, the user's consent) the other
    run's checkpoints (and its saved result, `remove_result`) are removed first, saying so; without it this is a
    UserError naming that run and the choices. Call it with the output folder's lock held.
    """
    if overwrite and is_main_process:
        # An output folder holds one result: the previous run's goes too (this run may save the other kind).
        remove_result(output_dir, "--overwrite_output_dir")
    names = checkpoint_dirs(output_dir)
    if not names:
        return
    if not overwrite:
        raise UserError(
            f"--output_dir {output_dir!r} holds the checkpoints of another run ({describe_output_dir_run(output_dir, names)}). "
            "Resume that run with --resume_from_checkpoint latest, pass --overwrite_output_dir to delete its "
            "checkpoints and start a new run there, or give this run another --output_dir."
        )
    if is_main_process:
        for name in names:
            remove_checkpoint(output_dir, name)
        logger.warning(
            f"--overwrite_output_dir: removed the checkpoints of the previous run in {output_dir} "
            f"({', '.join(names)}) before starting a new run."
        )


def set_aside_newer_checkpoints(output_dir: str, resume_dir: str) -> list[tuple[str, str]]:
    """Rename the checkpoints of `output_dir` newer than `resume_dir` to `superseded-checkpoint-N`; return
    (old, new) names.

    Resuming an older checkpoint starts another course of the run. The newer checkpoints of the first course
    are kept, never pruned nor overwritten (they may be the work the user wants back), but out of the way:
    otherwise `--resume_from_checkpoint latest` after a crash would pick one of them and mix the two courses,
    and this run's checkpoint-N would replace them. Main process only.
    """
    step = checkpoint_step(os.path.basename(os.path.normpath(resume_dir)))
    moved = []
    for name in checkpoint_dirs(output_dir):
        if step is None or checkpoint_step(name) <= step:
            continue
        target, n = f"superseded-{name}", 1
        while os.path.exists(os.path.join(output_dir, target)):
            n += 1
            target = f"superseded-{name}.{n}"
        os.replace(os.path.join(output_dir, name), os.path.join(output_dir, target))
        moved.append((name, target))
    if moved:
        fsync_dir(output_dir)
    return moved


# Test-only: the process SIGKILLs itself once checkpoint N is written under its temporary name, before the
# rename (the instant at which a save is most fragile); tests/test_reliability.py sets it.
KILL_AFTER_TMP_CHECKPOINT_ENV = "POGDIFF_TEST_KILL_AFTER_TMP_CHECKPOINT"


def save_checkpoint(
    accelerator, output_dir: str, global_step: int, run_settings: dict[str, Any], total_limit: int | None
) -> None:
    """accelerator.save_state into .tmp-checkpoint-N, recorded and fsynced, renamed to checkpoint-N; only then
    are checkpoints beyond --checkpoints_total_limit removed.

    A kill at any instant therefore leaves every checkpoint that was complete before (plus the new one once
    renamed), and never a half-written checkpoint-N that `latest` would pick.
    """
    name = f"checkpoint-{global_step}"
    final = os.path.join(output_dir, name)
    tmp = os.path.join(output_dir, f"{TEMP_PREFIX}{global_step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with disk_full_is_a_user_error(f"checkpoint {name}", output_dir):
            accelerator.save_state(tmp)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_run_record(tmp, global_step, run_settings)
                fsync_tree(tmp)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)  # the space it holds, back; earlier checkpoints are untouched
        raise
    if accelerator.is_main_process:
        if os.environ.get(KILL_AFTER_TMP_CHECKPOINT_ENV) == str(global_step):
            os.kill(os.getpid(), signal.SIGKILL)
        # A checkpoint-N already here is a damaged one that `latest` skipped (an explicit resume of an older
        # checkpoint set the newer ones aside first, so no good checkpoint is replaced here).
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(output_dir)
        logger.info(f"Saved state to {final}")
        if total_limit is not None:
            for old in prune_checkpoints(output_dir, total_limit, keep=name):
                logger.info(f"Removed old checkpoint {old} (--checkpoints_total_limit {total_limit})")
    accelerator.wait_for_everyone()


def select_resume_checkpoint(given: str, output_dir: str, is_main_process: bool) -> str | None:
    """The checkpoint folder --resume_from_checkpoint names, or None for `latest` in an output_dir without one.

    A path is used as given and must exist; a bare `checkpoint-N` is looked up in output_dir (as in
    train_text_to_image.py). `latest` skips damaged checkpoints, newest first, with a warning for each. Folders
    left by an interrupted save are removed first.
    """
    if is_main_process:
        for leftover in temp_checkpoint_dirs(output_dir):
            shutil.rmtree(os.path.join(output_dir, leftover))
            logger.info(
                f"Removed {leftover} from {output_dir}: an unfinished checkpoint of an interrupted save."
            )
    if given == "latest":
        names = checkpoint_dirs(output_dir)
        damaged = []
        for name in reversed(names):
            problem = checkpoint_problem(os.path.join(output_dir, name))
            if problem is None:
                for bad, why in damaged:
                    logger.warning(
                        f"Checkpoint {bad} is unreadable: {why}. Resuming from {name}, the newest readable one."
                    )
                return os.path.join(output_dir, name)
            damaged.append((name, problem))
        if damaged:
            raise UserError(
                f"No readable checkpoint in {output_dir}: "
                + "; ".join(f"{bad}: {why}" for bad, why in damaged)
                + ". Restore one, or remove them to start over."
            )
        return None
    path = given if os.sep in given or (os.altsep and os.altsep in given) else os.path.join(output_dir, given)
    if not os.path.isdir(path):
        raise UserError(
            f"--resume_from_checkpoint {given} does not exist. Give a checkpoint-N folder, a checkpoint-N name in "
            f"{output_dir} ({', '.join(checkpoint_dirs(output_dir)) or 'it has none'}), or 'latest'."
        )
    if checkpoint_step(os.path.basename(os.path.normpath(path))) is None:
        raise UserError(
            f"--resume_from_checkpoint {given} is not a checkpoint-N folder saved by train_pogdiff.py."
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"Checkpoint {given} is unreadable: {problem}. Resume from another one.")
    return path


def check_resume_settings(
    resume_dir: str, record: dict | None, settings: dict[str, Any], allow_changed_settings: bool
) -> None:
    """Refuse to continue a checkpoint with settings that change the result, unless --allow_changed_settings."""
    name = os.path.basename(os.path.normpath(resume_dir))
    if record is None:
        logger.warning(
            f"Checkpoint {name} has no pogdiff_run.json (an older train_pogdiff.py wrote it): whether this run's "
            "settings match the checkpoint's cannot be checked."
        )
        return
    saved = record["settings"]
    changed = settings_differences(saved, settings)
    if not changed:
        return
    differences = describe_differences(changed, saved, settings)
    if not allow_changed_settings:
        raise UserError(
            f"Checkpoint {name} belongs to a run with other settings: {differences}. Resume with the "
            "checkpoint's values, start a new run in another --output_dir, or pass --allow_changed_settings to "
            "continue anyway (the result will then differ from an uninterrupted run)."
        )
    kept = [key for key in changed if key in RESTORED_FROM_CHECKPOINT]
    logger.warning(
        f"--allow_changed_settings: continuing {name} with other settings ({differences}); the result will differ "
        "from an uninterrupted run."
        + (
            f" {', '.join(kept)} keep the checkpoint's values: the optimizer state holds them."
            if kept
            else ""
        )
    )


# ----------------------------------------------------------------------------------------------------------------
# The run record of a training output, and the size a model generates at
# ----------------------------------------------------------------------------------------------------------------


def save_run_settings(output_dir: str, global_step: int, settings: dict[str, Any]) -> str:
    """`output_dir/pogdiff_run.json`: the finished run's settings (`checkpointing.run_settings`), in the format of
    a checkpoint's record, so that the tools reading a training output find them whether or not it checkpointed."""
    path = os.path.join(output_dir, RUN_RECORD)
    record = {"format": RUN_RECORD_FORMAT, "global_step": global_step, "settings": settings}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return path


def recorded_run_settings(path: str) -> tuple[dict[str, Any], str] | None:
    """The settings a `train_pogdiff.py` output (or one of its checkpoints) was trained with, and the record they
    come from: the folder's own `pogdiff_run.json` (the final one, or a checkpoint's), else its newest checkpoint's.
    None for anything else (a Hub id, a model saved by other tools).

    Raises:
        UserError: a record exists but is not readable JSON with settings.
    """
    if not os.path.isdir(path):
        return None
    for folder in [path, *(os.path.join(path, name) for name in reversed(checkpoint_dirs(path)))]:
        record_path = os.path.join(folder, RUN_RECORD)
        if not os.path.isfile(record_path):
            continue
        try:
            with open(record_path, encoding="utf-8") as f:
                settings = json.load(f)["settings"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(
                f"{record_path} (the run record train_pogdiff.py wrote) is not readable ({error!r}); restore it or "
                "delete it and give the settings (e.g. --resolution) explicitly."
            ) from error
        return settings, record_path
    return None


def _model_file(model: str, name: str) -> str | None:
    """Path of `name` in a local model folder, or in the Hub model's cached (or, online, downloaded) files."""
    if os.path.isdir(model):
        path = os.path.join(model, name)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from .features import hub_offline

    try:
        cached = try_to_load_from_cache(model, name)
        if isinstance(cached, str) or hub_offline():
            return cached if isinstance(cached, str) else None
        return hf_hub_download(model, name)
    except (OSError, ValueError):  # not a Hub id, not found, no network: the caller says what to pass instead
        return None


def native_resolution(model: str) -> int | None:
    """The image size `model` generates at by default, as diffusers' pipelines compute it: the UNet's
    `sample_size` times the VAE's scale factor (2 ** (len(block_out_channels) - 1)). For a LoRA result folder,
    the size of the base model its model card names. None when the configs cannot be read."""
    unet_config = _model_file(model, "unet/config.json")
    vae_config = _model_file(model, "vae/config.json")
    if unet_config is None or vae_config is None:
        card = os.path.join(model, "README.md")
        if os.path.isdir(model) and os.path.isfile(card):
            from huggingface_hub import ModelCard

            base = ModelCard.load(card).data.base_model
            if isinstance(base, str) and base != model:
                return native_resolution(base)
        return None
    with open(unet_config, encoding="utf-8") as f:
        sample_size = json.load(f).get("sample_size")
    with open(vae_config, encoding="utf-8") as f:
        blocks = json.load(f).get("block_out_channels") or [0]
    if isinstance(
        sample_size, (list, tuple)
    ):  # (height, width) in some configs; these tools use square images
        sample_size = sample_size[0]
    return int(sample_size) * 2 ** (len(blocks) - 1) if isinstance(sample_size, int) else None


def training_resolution(model: str) -> tuple[int | None, str]:
    """The resolution to generate `model`'s images at and where it comes from: the `--resolution` of the run that
    trained it (its run record), else the model's own size (`native_resolution`); (None, reason) if neither."""
    recorded = recorded_run_settings(model)
    if recorded is not None and isinstance(recorded[0].get("--resolution"), int):
        return recorded[0]["--resolution"], f"--resolution of the run, from {recorded[1]}"
    size = native_resolution(model)
    if size is not None:
        return size, "the model's UNet sample_size x VAE scale factor"
    return None, "no run record (pogdiff_run.json) and no readable unet/vae config"


# The final result of a run in its output folder: one of a full pipeline or LoRA weights, never both.

LORA_RESULT_FILE = "pytorch_lora_weights.safetensors"
RESULT_TEMP = ".tmp-result"


def result_parts(output_dir: str) -> list[str]:
    """The entries of `output_dir` that make up a saved result: a pipeline's model_index.json and the component
    folders it names, LoRA weights (`pytorch_lora_weights.safetensors` and the webui copy named after the
    folder). Other files (checkpoints, logs, samples, the model card) are not part of it."""
    parts = []
    index_path = os.path.join(output_dir, "model_index.json")
    if os.path.isfile(index_path):
        parts.append("model_index.json")
        try:
            with open(index_path, encoding="utf-8") as f:
                components = [key for key in json.load(f) if not key.startswith("_")]
        except (OSError, ValueError, AttributeError):
            components = []
        parts += [name for name in components if os.path.isdir(os.path.join(output_dir, name))]
    for name in (LORA_RESULT_FILE, f"{os.path.basename(os.path.normpath(output_dir))}.safetensors"):
        if os.path.isfile(os.path.join(output_dir, name)):
            parts.append(name)
    return sorted(set(parts), key=parts.index)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def remove_result(output_dir: str, why: str) -> list[str]:
    """Remove the result saved in `output_dir` (`result_parts`), model_index.json first so that no instant
    leaves a folder that looks like a complete model; log what was removed and `why`. Returns the names."""
    parts = result_parts(output_dir)
    for name in parts:
        _remove(os.path.join(output_dir, name))
    if parts:
        logger.warning(f"{why}: removed the previous result in {output_dir} ({', '.join(parts)}).")
    return parts


def save_result_atomically(save_fn, output_dir: str, what: str = "the trained model") -> list[str]:
    """`save_fn(folder)` into a temporary folder inside `output_dir`, then the result moved into place whole.

    An output folder holds one result: a previous result that the new one does not replace file for file (a
    full pipeline after a LoRA run, or the reverse, or components the new pipeline lacks) is removed, saying so.
    A failure while saving (a full disk: a one-line UserError naming the folder) leaves the output folder as it
    was, with no half-written `unet/config.json` that would look like a model. Main process only. Returns the
    names of the previous result's parts that were removed.
    """
    tmp = os.path.join(output_dir, RESULT_TEMP)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with disk_full_is_a_user_error(what, output_dir):
            save_fn(tmp)
            fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    new = os.listdir(tmp)
    stale = [name for name in result_parts(output_dir) if name not in new]
    if stale:
        logger.warning(
            f"An output folder holds one result: removed the previous result's {', '.join(stale)} from {output_dir} "
            f"before saving this run's ({', '.join(sorted(new))})."
        )
    # model_index.json leaves first and comes back last: in between the folder does not look like a model.
    for name in ["model_index.json", *stale]:
        if os.path.lexists(os.path.join(output_dir, name)):
            _remove(os.path.join(output_dir, name))
    for name in sorted(new, key=lambda name: name == "model_index.json"):
        target = os.path.join(output_dir, name)
        if os.path.lexists(target):
            _remove(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)
    fsync_dir(output_dir)
    return stale
