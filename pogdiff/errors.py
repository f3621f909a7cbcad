"""The project's own error type for problems the user must fix, and how the command-line tools report it.

A `UserError` says what to fix (a flag, a file, a column) in its message; the scripts print that message as
one line and exit with status 2, without a traceback. Any other exception is a bug and stays loud. It
subclasses ValueError, so code that already catches ValueError around these calls keeps working.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

TRACEBACK_ENV = "POGDIFF_TRACEBACK"


class UserError(ValueError):
    """Bad input (data, flags, paths, models) with a message that names what to fix."""


def _own_message(error: BaseException) -> str:
    """`error`'s message, without the worker traceback torch puts in front of an error raised in a DataLoader
    worker (`torch._utils.ExceptionWrapper.reraise` rebuilds it as `UserError("Caught UserError in DataLoader
    worker process 0.\nOriginal Traceback ...\npogdiff.errors.UserError: <message>")`)."""
    text = str(error)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        kind, sep, message = last.partition(": ")
        if sep and kind.rsplit(".", 1)[-1] == type(error).__name__:
            where = text.split("\n", 1)[0].removeprefix(f"Caught {type(error).__name__} ").rstrip(".")
            return f"{message} ({where})"
    return text


def user_error_message(prog: str, error: BaseException) -> str:
    """What a command-line tool prints for a `UserError`: the POGDIFF_TRACEBACK hint, then `<prog>: error: ...`.

    The error line comes last on purpose: it is the line a user reads (and the last line a log shows), also
    under `accelerate launch --quiet`, which adds nothing after the script's own output.
    """
    return f"\n({TRACEBACK_ENV}=1 shows the traceback of this error)\n{prog}: error: {_own_message(error)}"


def report_user_errors(prog: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, with a `UserError` printed as `<prog>: error: <message>` and exit status 2.

    Set POGDIFF_TRACEBACK=1 to get the traceback instead (the error is re-raised).
    """
    try:
        return fn(*args, **kwargs)
    except UserError as error:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(user_error_message(prog, error), file=sys.stderr)
        sys.exit(2)


def model_load_message(flag: str, name_or_path: str, error: Exception) -> str:
    """What to tell a user whose model (`flag` = `name_or_path`) did not load, by the likely cause."""
    from huggingface_hub import constants

    if os.path.isdir(name_or_path):
        found = sorted(os.listdir(name_or_path))[:8]
        return (
            f"{flag} {name_or_path!r} is a folder but not a diffusers Stable Diffusion model: it needs "
            "model_index.json and the scheduler/, tokenizer/, text_encoder/, vae/ and unet/ subfolders (SDXL: "
            "tokenizer_2/ and text_encoder_2/ too) (or, for a "
            f"LoRA result, pytorch_lora_weights.safetensors and its model card); it holds {found or 'nothing'}. "
            "Point it at the folder `save_pretrained` or train_pogdiff.py wrote, or at a Hub id."
        )
    if name_or_path.startswith((".", "/", "~")) or os.path.sep * 2 in name_or_path:
        return f"{flag} {name_or_path!r}: no such folder."
    if constants.HF_HUB_OFFLINE:
        return (
            f"{flag} {name_or_path!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE "
            f"is set, so it cannot be downloaded: download it once online (`hf download {name_or_path}`), or "
            "unset HF_HUB_OFFLINE."
        )
    return f"{flag} {name_or_path!r} could not be loaded ({error}). Check the Hub id, your token and the network."


def missing_model_parts(folder: str, parts: tuple[str, ...]) -> list[str]:
    """The `parts` subfolders (the family's, `ModelFamily.model_parts`) `folder` lacks (transformers fails on a
    missing tokenizer/ with "OverflowError: int too big to convert", which names neither the folder nor the
    part)."""
    return [part for part in parts if not os.path.isdir(os.path.join(folder, part))]


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full: an OSError with ENOSPC/EDQUOT, or a library's
    own error carrying that message (torch's writer raises RuntimeError "file write failed")."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


@contextmanager
def disk_full_is_a_user_error(what: str, folder: str | os.PathLike) -> Iterator[None]:
    """Run the body; a full disk becomes a UserError that says so and names `folder` and what was being saved."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise UserError(
            f"The disk is full: no space left while saving {what} to {os.path.abspath(folder)} ({error}). Free "
            "space on that disk or give another folder, then run again."
        ) from error
