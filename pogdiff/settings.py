"""What each trainer flag means beyond its parsing, declared once per flag.

A flag's declaration says whether it changes a run's result (`exact`: a resume must match it, so it is in the
run record `checkpointing.run_settings` writes), whether it keys the neighbour-index cache (`index`:
`arguments.index_build_kwargs`), whether the model card shows it (`card`), its valid range (`bounds`:
`arguments.FLAG_RANGES`), and whether a resume takes it from the optimizer's state rather than from the flag
(`restored`). Every list that used to name flags for one of those roles is derived from here.

Upstream's flags are declared in `train_pogdiff.py`'s `parse_args` exactly as `train_text_to_image.py` declares
them, so their metadata is the `UPSTREAM` table below, keyed by dest and in upstream's order. PoGDiff's own flags
pass theirs where they are declared (`arguments.add`). A test checks that every flag of the trainer is declared.

This module imports nothing of `pogdiff`: `arguments`, `checkpointing`, `hub`, `index` and `training`
all read it.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# The choices of --neighbor_forward (`training` implements them; the flags are declared before it). --objective's
# are the registered objectives (`objectives.OBJECTIVES`).
NEIGHBOR_FORWARD_MODES = ("auto", "eager", "cuda_graph")


@dataclass(frozen=True)
class Bounds:
    """A closed, open or half-open interval; None is unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{low}, {high}{right}"


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def at_least(low: float, why: str = "") -> Bounds:
    return Bounds(low, why=why)


def above(low: float, why: str = "") -> Bounds:
    return Bounds(low, low_open=True, why=why)


COUNT = at_least(1)
PROBABILITY = Bounds(0, 1, high_open=True)
# n ** (p - 1) stays a finite float64 for any identity size n below 1e9 when |p - 1| <= 11.
SAMPLING_POWER = Bounds(-10, 10, why="n^(p-1) must stay a finite number for every identity size n")


@dataclass(frozen=True)
class Setting:
    """One flag's roles (see the module docstring). `card` is True, False, or the dest of a flag that must be on
    for the card to show this one (LoRA's rank only means something with --use_lora)."""

    dest: str
    exact: bool = False
    index: bool = False
    card: bool | str = False
    bounds: Bounds | None = None
    restored: bool = False
    upstream: bool = False


# Every declared flag, by dest, in declaration order (upstream's first, then PoGDiff's).
REGISTRY: dict[str, Setting] = {}


def declare(
    dest: str,
    *,
    exact: bool = False,
    index: bool = False,
    card: bool | str = False,
    bounds: Bounds | None = None,
    restored: bool = False,
    upstream: bool = False,
) -> Setting:
    """Record a flag's roles. Declaring the same flag again with the same roles is a no-op (a parser built twice);
    with other roles it is a bug."""
    setting = Setting(dest, exact, index, card, bounds, restored, upstream)
    known = REGISTRY.get(dest)
    if known is not None and known != setting:
        raise ValueError(f"--{dest} is declared twice with different roles: {known} and {setting}.")
    REGISTRY[dest] = setting
    return setting


# Flags that only say where, how often or how loudly (output_dir, logging, checkpointing_steps, max_train_steps,
# validation, report_to, dataloader workers, hub) are not `exact` on purpose: changing them is what a resume is for.
_E = {"exact": True}
UPSTREAM: dict[str, dict[str, Any]] = {
    "input_perturbation": {**_E, "bounds": at_least(0)},
    "pretrained_model_name_or_path": {**_E, "index": True},
    "revision": {**_E, "index": True},
    "variant": {**_E, "index": True},
    "dataset_name": {},
    "dataset_config_name": {},
    "train_data_dir": {},
    "image_column": _E,
    "caption_column": _E,
    "max_train_samples": {"bounds": COUNT},  # the data fingerprint covers it
    "validation_prompts": {},
    "output_dir": {},
    "cache_dir": {},
    "seed": {**_E, "card": True, "bounds": Bounds(0, 2**32 - 1, why="numpy's seeds are 32-bit")},
    "resolution": {**_E, "index": True, "card": True, "bounds": at_least(8, why="the VAE downsamples by 8")},
    "center_crop": _E,
    "random_flip": _E,
    "train_batch_size": {**_E, "card": True, "bounds": COUNT},
    "num_train_epochs": {"bounds": COUNT},
    "max_train_steps": {
        "card": True,
        "bounds": at_least(1, why="0 steps would save the base model as the result"),
    },
    "gradient_accumulation_steps": {**_E, "card": True, "bounds": COUNT},
    "gradient_checkpointing": {},
    # 0 is allowed: a run that must not move the weights (e.g. to check validation or a pipeline) uses it.
    "learning_rate": {
        **_E,
        "card": True,
        "restored": True,
        "bounds": at_least(0, why="a negative learning rate climbs the loss"),
    },
    "scale_lr": {**_E, "restored": True},
    "lr_scheduler": _E,
    "lr_warmup_steps": {**_E, "bounds": at_least(0)},
    "snr_gamma": {
        **_E,
        "card": True,
        "bounds": above(0, why="Min-SNR weights min(SNR, gamma) / SNR: 0 zeroes the loss, < 0 flips it"),
    },
    "dream_training": _E,
    "dream_detail_preservation": {**_E, "bounds": above(0)},
    "use_8bit_adam": _E,
    "allow_tf32": _E,
    "use_ema": {**_E, "card": True},
    "offload_ema": {},
    "foreach_ema": {},
    "non_ema_revision": _E,
    "dataloader_num_workers": {"bounds": at_least(0)},
    "adam_beta1": {**_E, "restored": True, "bounds": PROBABILITY},
    "adam_beta2": {**_E, "restored": True, "bounds": PROBABILITY},
    "adam_weight_decay": {**_E, "restored": True, "bounds": at_least(0)},
    "adam_epsilon": {**_E, "restored": True, "bounds": above(0)},
    "max_grad_norm": {
        **_E,
        "bounds": above(0, why="clipping to a norm <= 0 zeroes or reverses every update"),
    },
    "push_to_hub": {},
    "hub_token": {},
    "prediction_type": _E,
    "hub_model_id": {},
    "logging_dir": {},
    "mixed_precision": {**_E, "card": True},
    "report_to": {},
    "local_rank": {"bounds": at_least(-1)},
    "checkpointing_steps": {"bounds": COUNT},
    "checkpoints_total_limit": {"bounds": COUNT},
    "resume_from_checkpoint": {},
    "enable_xformers_memory_efficient_attention": _E,
    "noise_offset": {**_E, "bounds": at_least(0)},
    "validation_epochs": {"bounds": COUNT},
    "tracker_project_name": {},
    "image_interpolation_mode": _E,
}
for _dest, _roles in UPSTREAM.items():
    declare(_dest, upstream=True, **_roles)


# ---- Derived views (read the registry when called, so that a flag declared later is included) -----------------


def exact_dests() -> tuple[str, ...]:
    """Flags whose change makes a resumed run differ from the uninterrupted one (`checkpointing.run_settings`)."""
    return tuple(s.dest for s in REGISTRY.values() if s.exact)


def index_dests() -> tuple[str, ...]:
    """Flags that key the neighbour-index cache, passed to `index.build_or_load_index` under their own names."""
    return tuple(s.dest for s in REGISTRY.values() if s.index)


def flag_ranges() -> dict[str, Bounds]:
    """The valid range of every numeric flag."""
    return {s.dest: s.bounds for s in REGISTRY.values() if s.bounds is not None}


def restored_flags() -> frozenset[str]:
    """Of the exact flags, those a resumed run takes from the optimizer's state (param_groups, the LR scheduler's
    base_lrs) whatever the flags say, as typed (`--learning_rate`)."""
    return frozenset(f"--{s.dest}" for s in REGISTRY.values() if s.restored)


def values_of(args: argparse.Namespace | Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view of the flag values: `pogdiff/` functions take this (or any mapping) and never change it."""
    return types.MappingProxyType(vars(args) if isinstance(args, argparse.Namespace) else dict(args))


def card_rows(args: argparse.Namespace | Mapping[str, Any], *, seed: int) -> Iterator[tuple[str, Any]]:
    """The model card's settings table, (flag, value): PoGDiff's flags first, then upstream's, each in declaration
    order. `seed` is the seed the run used (drawn, or the resumed checkpoint's, when --seed was not given)."""
    values = values_of(args)
    settings = [s for s in REGISTRY.values() if s.card and not s.upstream]
    settings += [s for s in REGISTRY.values() if s.card and s.upstream]
    for setting in settings:
        if isinstance(setting.card, str) and not values.get(setting.card):
            continue
        yield setting.dest, seed if setting.dest == "seed" else values[setting.dest]
