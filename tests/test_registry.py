"""One registry per extension point: an objective or a sampling scheme registered from this file alone trains
through train_pogdiff.py (in-process: the registration lives in this process), with no other file changed."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import run_in_process, train_args, training_logs

from pogdiff.families import unet_prediction
from pogdiff.objectives import OBJECTIVES, Objective, get_objective, register_objective, vanilla_loss
from pogdiff.sampling import SAMPLING_SCHEMES, SamplingScheme, register_sampling_scheme, sampling_label
from pogdiff.training import objective_loss


class TwiceVanilla(Objective):
    """A toy objective: plain fine-tuning's loss, doubled."""

    name = "toy"

    def loss(self, unet, inputs):
        model_pred = unet_prediction(
            unet, inputs.noisy_latents, inputs.timesteps, inputs.encoder_hidden_states
        )
        loss, logs = vanilla_loss(model_pred, inputs.target, inputs.snr_weights)
        return 2 * loss, {**logs, "toy_factor": 2.0}


def only_chen(identities, index, power):
    """A toy sampling scheme: every draw is an image of `chen`."""
    return torch.tensor([1.0 if name == "chen" else 0.0 for name in identities], dtype=torch.float64)


@pytest.fixture
def toy_objective():
    objective = register_objective(TwiceVanilla())
    yield objective
    OBJECTIVES.pop(objective.name)


@pytest.fixture
def toy_scheme():
    scheme = register_sampling_scheme(SamplingScheme("only_chen", only_chen))
    yield scheme
    SAMPLING_SCHEMES.pop(scheme.name)


def test_built_in_registries():
    assert list(OBJECTIVES) == ["vanilla", "pogdiff", "cbdm", "t2h"]
    assert [o.name for o in OBJECTIVES.values() if o.needs_index] == ["pogdiff", "t2h"]
    assert [o.name for o in OBJECTIVES.values() if o.uses_neighbors] == ["pogdiff"]
    assert list(SAMPLING_SCHEMES) == ["uniform", "balanced", "sqrt", "density"]
    assert [s.name for s in SAMPLING_SCHEMES.values() if s.needs_index] == ["density"]
    with pytest.raises(ValueError, match="already registered"):
        register_objective(TwiceVanilla.__mro__[1]())  # a second "vanilla"
    with pytest.raises(ValueError, match="--objective must be one of vanilla, pogdiff, cbdm, t2h"):
        get_objective("nope")


def test_registered_objective_is_a_flag_choice_and_dispatches_by_name(toy_objective, tiny_sd_path):
    from diffusers import UNet2DConditionModel

    import train_pogdiff

    args = train_pogdiff.parse_args(
        ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", "x", "--objective", "toy"]
    )
    assert args.objective == "toy"
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 500])
    target = torch.randn(2, 4, 8, 8, generator=generator)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        toy, logs = objective_loss("toy", unet, x, t, target, cond)
        vanilla, _ = objective_loss("vanilla", unet, x, t, target, cond)
    assert torch.equal(toy, 2 * vanilla) and logs["toy_factor"] == 2.0


def test_toy_objective_trains_through_the_trainer(toy_objective, tiny_sd_path, tiny_dataset_path, tmp_path):
    """The same seed draws the same batch, noise and timesteps: the first step's loss is exactly twice vanilla's."""
    for name in ("vanilla", "toy"):
        run_in_process(train_args(tiny_sd_path, tiny_dataset_path, tmp_path / name, "--objective", name))
    vanilla, toy = training_logs(tmp_path / "vanilla"), training_logs(tmp_path / "toy")
    assert toy["train_loss"][0] == 2 * vanilla["train_loss"][0]
    assert toy["toy_factor"] == [2.0, 2.0]
    assert "| objective | toy |" in (tmp_path / "toy" / "README.md").read_text()


def test_toy_sampling_scheme_drives_the_draws(toy_scheme, tiny_sd_path, tiny_dataset_path, tmp_path):
    out = tmp_path / "chen"
    run_in_process(
        train_args(tiny_sd_path, tiny_dataset_path, out, "--objective", "vanilla", "--sampling", "only_chen")
    )
    counts = json.loads((out / "sample_counts.json").read_text())
    assert counts["sampling"] == "only_chen"
    drawn = counts["samples_per_identity"]
    assert drawn["chen"] == 2 * 4 and sum(drawn.values()) == 2 * 4
    assert "| sampling | only_chen |" in (out / "README.md").read_text()


def test_sampling_label_of_a_registered_scheme(toy_scheme):
    from types import SimpleNamespace

    assert (
        sampling_label(SimpleNamespace(sampling="only_chen", sampling_power=None)) == "--sampling only_chen"
    )
