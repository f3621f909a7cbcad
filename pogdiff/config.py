"""`--config FILE`: any flag set from a TOML (or YAML) file, by its dest name, and the file a run writes back.

    # run.toml
    pretrained_model_name_or_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    train_data_dir = "data/faces"
    learning_rate = 1e-5
    use_lora = true
    validation_prompts = ["An image of chen.", "An image of ana."]

A key is a flag's name without `--` (tables group keys and are otherwise ignored). Each value goes through the
flag's own type, choices and checks, exactly as on the command line, and the command line wins over the file: the
file's values become the parser's defaults. An unknown key or a bad value ends the program with one line naming
the file and the key (`parser.error`, exit 2).

`write_config` writes the settings of a run as such a file (`train_pogdiff.py` puts `pogdiff_config.toml` in
`--output_dir`), so that `--config output_dir/pogdiff_config.toml` re-runs it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

CONFIG_FILE = "pogdiff_config.toml"
# Never read from or written to a file: the file itself, help, the launcher's rank, and a secret.
NOT_IN_FILES = frozenset({"config", "help", "local_rank", "hub_token"})
_NOT_IN_FILES_WHY = {
    "hub_token": "a secret: pass --hub_token, or log in with `hf auth login`",
    "local_rank": "the launcher sets it",
    "config": "one file at a time",
}
_FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction)


def add_config_argument(container) -> None:
    """The `--config` flag (a parser or an argument group)."""
    container.add_argument(
        "--config",
        type=str,
        default=None,
        metavar="FILE",
        help="A .toml (or .yaml) file of settings: `learning_rate = 1e-5`, one key per flag (its name without --). "
        "Flags on the command line override it. Every run writes its settings as output_dir/pogdiff_config.toml.",
    )


def read_config_file(path: str) -> dict[str, Any]:
    """The file's keys and values (tables flattened).

    Raises:
        ValueError: a message naming the file (missing, unreadable, not TOML / YAML, a key twice).
    """
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file.")
    extension = os.path.splitext(path)[1].lower()
    toml = _toml_reader() if extension == ".toml" else None
    try:
        if toml is not None:
            with open(path, "rb") as f:
                data = toml.load(f)
        elif extension in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(
                    f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or write the file as .toml."
                ) from None
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
            data = {} if data is None else data
        else:
            raise ValueError(
                f"--config {path}: use a .toml (or .yaml / .yml) file, got {extension or 'no extension'}."
            )
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--config {path}: {' '.join(str(error).split())}") from None
    except Exception as error:  # tomllib's or yaml's parse error, without importing yaml when it is not used
        if type(error).__module__.split(".")[0] not in ("tomllib", "tomli", "yaml"):
            raise
        what = "YAML" if toml is None else "TOML"
        raise ValueError(f"--config {path}: not valid {what}: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"--config {path}: the file must hold key = value settings, got {type(data).__name__}."
        )
    flat: dict[str, Any] = {}
    for key, value in _flatten(data):
        if key in flat:
            raise ValueError(f"--config {path}: {key} is set twice.")
        flat[key] = value
    return flat


def _toml_reader():
    """tomllib (Python >= 3.11), else tomli if installed."""
    try:
        import tomllib

        return tomllib
    except ImportError:
        pass
    try:
        import tomli

        return tomli
    except ImportError:
        raise ValueError(
            "--config: reading TOML needs Python >= 3.11 (tomllib) or `pip install tomli`; or write the file as "
            ".yaml (PyYAML comes with accelerate)."
        ) from None


def _flatten(data: Mapping[str, Any]):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value)
        else:
            yield str(key), value


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    """`value` as the command line would have given it to `action`: its type, nargs and choices.

    Raises:
        ValueError: the reason, without the file's name.
    """
    if isinstance(action, _FLAG_ACTIONS):
        if not isinstance(value, bool):
            raise ValueError(f"{key} is an on/off flag: give true or false, got {value!r}.")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many:
        items = list(value) if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise ValueError(f"{key} takes at least one value, got an empty list.")
    elif isinstance(value, list):
        raise ValueError(f"{key} takes one value, got a list {value!r}.")
    else:
        items = [value]
    converted = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(f"{key} takes {_kind(action)}, got {item!r}.")
        text = item if isinstance(item, str) else repr(item)
        try:
            result = action.type(text) if action.type is not None else text
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            why = str(error) if isinstance(error, argparse.ArgumentTypeError) else f"not {_kind(action)}"
            raise ValueError(f"{key} = {item!r}: {why}.") from None
        if action.choices is not None and result not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise ValueError(f"{key} = {item!r}: must be one of {choices}.")
        converted.append(result)
    return converted if many else converted[0]


def _kind(action: argparse.Action) -> str:
    name = getattr(action.type, "__name__", "str")
    return {"int": "an integer", "float": "a number", "str": "a string"}.get(
        name, f"a {name.strip('_')} value"
    )


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """If `argv` (sys.argv[1:] when None) has `--config FILE`, make the file's values `parser`'s defaults, so
    that the command line still overrides them, and count a required flag the file sets as given. Returns the
    converted values ({} without --config). A problem ends the program through `parser.error` (one line)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", default=None)
    path = early.parse_known_args(argv)[0].config
    if path is None:
        return {}
    try:
        values = read_config_file(path)
    except ValueError as error:
        parser.error(str(error))
    actions = {
        action.dest: action
        for action in parser._actions
        if action.option_strings and action.dest not in NOT_IN_FILES and action.help != argparse.SUPPRESS
    }
    defaults = {}
    for key, value in values.items():
        action = actions.get(key)
        if key in NOT_IN_FILES:
            parser.error(
                f"--config {path}: {key} is not read from a file ({_NOT_IN_FILES_WHY.get(key, 'not a setting')})."
            )
        if action is None:
            close = difflib.get_close_matches(key, actions, n=1)
            hint = (
                f" (did you mean {close[0]}?)"
                if close
                else " (keys are flag names without --, e.g. learning_rate)"
            )
            parser.error(f"--config {path}: unknown setting {key!r}{hint}.")
        try:
            defaults[key] = _convert(action, key, value)
        except ValueError as error:
            parser.error(f"--config {path}: {error}")
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False
    for group in parser._mutually_exclusive_groups:
        if group.required and any(action.dest in defaults for action in group._group_actions):
            group.required = False
    return defaults


def config_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Every flag of `parser` that a file may hold, with its value in `args` (parser order): what `write_config`
    writes. Take it right after parsing, before any value is filled in from another. A None is kept as None
    (written as a comment: the flag's default) unless the flag's type reads "none" as None (`--density_w_min none`,
    whose default is not None): then it is "none", which reads back as None."""
    values = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_IN_FILES or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value is None and action.type is not None:
            try:
                value = "none" if action.type("none") is None else None
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                value = None
        values[action.dest] = value
    return values


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value)
            if math.isfinite(value)
            else ("nan" if math.isnan(value) else f"{'-' if value < 0 else ''}inf")
        )
    if isinstance(value, str):
        return json.dumps(
            value, ensure_ascii=False
        )  # JSON's string escapes are a subset of TOML's basic string's
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def config_text(values: Mapping[str, Any], header: str = "") -> str:
    """`values` as TOML, one `key = value` line each; a None as a comment (TOML has no null: the flag's default)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for key, value in values.items():
        if value is None:
            lines.append(f"# {key} = (none)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_config(path: str, values: Mapping[str, Any], *, program: str = "train_pogdiff.py") -> str:
    """`values` (`config_values`) as a TOML file at `path`, written whole or not at all; returns `path`."""
    header = (
        f"The settings of a {program} run, as resolved from its command line and --config file.\n"
        f"Re-run it with: {program} --config {os.path.basename(path)} (paths as given, from {os.getcwd()})."
    )
    text = config_text(values, header)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
