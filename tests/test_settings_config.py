"""Each setting declared once (`pogdiff.settings`), and `--config FILE` (`pogdiff.config`)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from pogdiff import settings

REPO = Path(__file__).resolve().parent.parent
BASE = ["--pretrained_model_name_or_path", "x", "--train_data_dir", "y"]

# The lists as they were written out by hand before the declarations (issue 22): nothing may change silently.
EXACT_BEFORE = {
    "pretrained_model_name_or_path", "revision", "variant", "non_ema_revision", "prediction_type", "image_column",
    "caption_column", "identity_column", "resolution", "center_crop", "random_flip", "image_interpolation_mode",
    "cache_latents", "seed", "train_batch_size", "gradient_accumulation_steps", "input_perturbation",
    "noise_offset", "snr_gamma", "dream_training", "dream_detail_preservation", "learning_rate", "scale_lr",
    "lr_scheduler", "lr_warmup_steps", "use_8bit_adam", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "mixed_precision", "allow_tf32", "enable_xformers_memory_efficient_attention",
    "use_ema", "use_lora", "rank", "lora_alpha", "lora_target_modules", "objective", "neighbor_grad",
    "caption_dropout_prob", "sampling", "sampling_power", "sampling_weight_column", "cbdm_tau", "cbdm_gamma",
}  # fmt: skip
INDEX_ARGUMENTS_BEFORE = {
    "neighbor_encoder", "num_neighbors", "psi_a1", "psi_a2", "psi_a3", "psi_terms", "density_latent_dim",
    "density_hidden_dim", "density_epochs", "density_lr", "density_num_samples", "density_temperature",
    "density_w_min", "density_w_max", "few_shot_max",
}  # fmt: skip
DENSITY_BEFORE = (
    "density_latent_dim", "density_hidden_dim", "density_epochs", "density_lr", "density_num_samples",
    "density_temperature", "density_w_min", "density_w_max",
)  # fmt: skip
INDEX_KEYS_BEFORE = {
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "neighbor_encoder",
    "num_neighbors",
    "resolution",
    *DENSITY_BEFORE,
}
RANGES_BEFORE = {
    "input_perturbation", "max_train_samples", "seed", "resolution", "train_batch_size", "num_train_epochs",
    "max_train_steps", "gradient_accumulation_steps", "learning_rate", "lr_warmup_steps", "snr_gamma",
    "dream_detail_preservation", "dataloader_num_workers", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "local_rank", "checkpointing_steps", "checkpoints_total_limit", "noise_offset",
    "validation_epochs", "num_neighbors", "psi_a1", "psi_a2", "psi_a3", "density_latent_dim", "density_hidden_dim",
    "density_epochs", "density_lr", "density_num_samples", "density_temperature", "density_w_min", "density_w_max",
    "few_shot_max", "caption_dropout_prob", "sampling_power", "cbdm_tau", "cbdm_gamma", "validation_steps",
    "num_validation_images", "num_validation_inference_steps", "rank", "lora_alpha",
}  # fmt: skip
RESTORED_BEFORE = {
    "--learning_rate",
    "--scale_lr",
    "--adam_beta1",
    "--adam_beta2",
    "--adam_weight_decay",
    "--adam_epsilon",
}


def parse(*argv: str) -> argparse.Namespace:
    import train_pogdiff

    return train_pogdiff.parse_args(list(argv))


def trainer_dests() -> list[str]:
    from tests.test_train import train_pogdiff_parser_actions

    return [
        a.dest
        for a in train_pogdiff_parser_actions()
        if a.option_strings and a.dest not in ("help", "config")
    ]


# ---- the declarations ------------------------------------------------------------------------------------------


def test_derived_lists_equal_the_hand_written_ones():
    from pogdiff.arguments import DENSITY_FLAGS, FLAG_RANGES, index_build_kwargs
    from pogdiff.checkpointing import (
        EXACTNESS_FLAGS,
        RESTORED_FROM_CHECKPOINT,
        index_flag_dests,
        run_settings,
    )

    # Since: diffusers' SDXL scripts' --pretrained_vae_model_name_or_path (it changes the result).
    assert set(EXACTNESS_FLAGS) == EXACT_BEFORE | {"pretrained_vae_model_name_or_path"}
    assert set(index_flag_dests()) == INDEX_ARGUMENTS_BEFORE
    assert DENSITY_FLAGS == DENSITY_BEFORE
    assert set(index_build_kwargs(parse(*BASE))) == INDEX_KEYS_BEFORE
    assert set(FLAG_RANGES) == RANGES_BEFORE
    assert RESTORED_FROM_CHECKPOINT == RESTORED_BEFORE
    record = run_settings(parse(*BASE), seed=3, data_fingerprint="f", num_processes=1)
    flags = {f"--{d}" for d in EXACT_BEFORE | INDEX_ARGUMENTS_BEFORE | {"pretrained_vae_model_name_or_path"}}
    assert set(record) == flags | {"data_fingerprint", "num_processes"}


def test_every_trainer_flag_is_declared_once():
    """A new flag must say whether it changes the result (and the rest): undeclared ones fail here."""
    dests = trainer_dests()
    assert len(dests) == len(set(dests))
    assert set(dests) - settings.REGISTRY.keys() == set(), (
        "declare the flag (pogdiff.arguments.add / UPSTREAM)"
    )
    assert settings.REGISTRY.keys() - set(dests) == set(), "a declaration for a flag that does not exist"
    assert [d for d in dests if settings.REGISTRY[d].upstream] == list(settings.UPSTREAM)


def test_a_new_exact_flag_reaches_the_run_record_with_no_other_edit(monkeypatch):
    from pogdiff.arguments import add
    from pogdiff.checkpointing import run_settings

    monkeypatch.setattr(settings, "REGISTRY", dict(settings.REGISTRY))
    parser = argparse.ArgumentParser()
    add(parser, "--new_knob", type=float, default=0.5, exact=True, card=True, bounds=settings.at_least(0))
    args = parse(*BASE)
    args.new_knob = parser.parse_args([]).new_knob
    record = run_settings(args, seed=0, data_fingerprint="f", num_processes=1)
    assert record["--new_knob"] == 0.5
    assert ("new_knob", 0.5) in list(settings.card_rows(args, seed=0))
    assert "new_knob" in settings.flag_ranges()
    # A mapping of the values works as well as the namespace (pogdiff/ functions take read-only values).
    assert run_settings(settings.values_of(args), seed=0, data_fingerprint="f", num_processes=1) == record


def test_a_conflicting_redeclaration_is_refused(monkeypatch):
    monkeypatch.setattr(settings, "REGISTRY", dict(settings.REGISTRY))
    settings.declare(
        "seed", **{k: v for k, v in settings.UPSTREAM["seed"].items()}, upstream=True
    )  # same: no-op
    with pytest.raises(ValueError, match="declared twice"):
        settings.declare("seed", exact=False)


def test_the_card_shows_lora_settings_only_with_lora():
    rows = dict(settings.card_rows(parse(*BASE), seed=7))
    assert rows["seed"] == 7 and rows["objective"] == "pogdiff" and "rank" not in rows
    rows = dict(settings.card_rows(parse(*BASE, "--use_lora", "--rank", "8"), seed=7))
    assert (rows["rank"], rows["lora_alpha"]) == (8, 8)


def test_arguments_does_not_import_training():
    code = "import sys, pogdiff.arguments; print('pogdiff.training' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


# ---- --config ----------------------------------------------------------------------------------------------


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    config = write(
        tmp_path / "run.toml",
        'pretrained_model_name_or_path = "m"\ntrain_data_dir = "d"\nlearning_rate = 1e-5\n'
        'validation_prompts = ["a", "b"]\nuse_lora = true\nrank = 8\n'
        '[pogdiff]\nobjective = "vanilla"\ndensity_w_min = "none"\n',
    )
    args = parse("--config", config)  # the required flag comes from the file
    assert (args.pretrained_model_name_or_path, args.train_data_dir) == ("m", "d")
    assert (args.learning_rate, args.validation_prompts, args.use_lora, args.rank) == (
        1e-5,
        ["a", "b"],
        True,
        8,
    )
    assert (args.objective, args.density_w_min, args.lora_alpha) == ("vanilla", None, 8)
    args = parse("--config", config, "--learning_rate", "2e-4", "--validation_prompts", "c", "--rank", "2")
    assert (args.learning_rate, args.validation_prompts, args.rank, args.lora_alpha) == (2e-4, ["c"], 2, 2)


def test_a_yaml_config_file(tmp_path):
    pytest.importorskip("yaml")
    config = write(
        tmp_path / "run.yaml", "pretrained_model_name_or_path: m\ntrain_data_dir: d\nlearning_rate: 1e-5\n"
    )
    assert parse("--config", config).learning_rate == 1e-5


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rat = 1e-5\n", "unknown setting 'learning_rat' (did you mean learning_rate?)"),
        ("no_such_thing = 1\n", "unknown setting 'no_such_thing'"),
        ('learning_rate = "fast"\n', "learning_rate = 'fast': not a number"),
        ("train_batch_size = 1.5\n", "train_batch_size = 1.5: not an integer"),
        ('use_lora = "yes"\n', "use_lora is an on/off flag: give true or false"),
        ('objective = "best"\n', "objective = 'best': must be one of vanilla, pogdiff, cbdm, t2h"),
        ("validation_prompts = []\n", "validation_prompts takes at least one value"),
        ("resolution = [1, 2]\n", "resolution takes one value"),
        ('hub_token = "secret"\n', "hub_token is not read from a file (a secret"),
        ("learning_rate = \n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_file_and_key(tmp_path, capsys, text, message):
    config = write(tmp_path / "bad.toml", text)
    with pytest.raises(SystemExit) as exit_info:
        parse(*BASE, "--config", config)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: --config " in error and config in error, error
    assert message in error, error


def test_config_values_pass_the_flags_checks(tmp_path, capsys):
    """Ranges, the finiteness check and the cross-flag checks apply to values from a file as to typed ones."""
    for text, message in [
        ("max_grad_norm = -1\n", "--max_grad_norm must be > 0"),
        ("psi_a1 = nan\n", "--psi_a1 must be a finite number"),
        ('sampling = "sqrt"\nsampling_power = 0.3\n', "both set how images are drawn"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parse(*BASE, "--config", write(tmp_path / "c.toml", text))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_bad_config_through_the_script_is_one_line(tmp_path):
    config = write(tmp_path / "bad.toml", "learning_rat = 1e-5\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_pogdiff.py"), "--config", config, *BASE],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train_pogdiff.py: error")]
    assert len(lines) == 1 and "learning_rat" in lines[0] and "bad.toml" in lines[0], proc.stderr


def test_missing_or_unknown_config_file(tmp_path, capsys):
    for path, message in [(tmp_path / "none.toml", "no such file"), (tmp_path / "run.ini", "use a .toml")]:
        if path.suffix == ".ini":
            path.write_text("x = 1\n")
        with pytest.raises(SystemExit):
            parse(*BASE, "--config", str(path))
        assert message in capsys.readouterr().err


def test_the_written_config_reparses_to_the_same_flags(tmp_path):
    from pogdiff.config import write_config

    original = parse(
        *BASE, "--learning_rate", "3e-5", "--validation_prompts", 'say "hi"\tthere', "ünï", "--use_lora",
        "--sampling", "sqrt", "--density_w_min", "none", "--snr_gamma", "5", "--seed", "11",
        "--hub_token", "secret", "--lora_target_modules", "to_k,to_q",
    )  # fmt: skip
    path = write_config(str(tmp_path / "pogdiff_config.toml"), original.config_values)
    text = Path(path).read_text(encoding="utf-8")
    assert "secret" not in text and "hub_token" not in text
    assert "# revision = (none)" in text and 'density_w_min = "none"' in text
    again = parse("--config", path)
    for dest in trainer_dests():
        if dest != "hub_token":
            assert getattr(again, dest) == getattr(original, dest), dest
    assert again.config_values == original.config_values


def test_config_text_types():
    import tomllib

    from pogdiff.config import config_text

    values = {"s": 'a"b\\c\n', "i": 3, "f": 1e-05, "big": 1e20, "b": False, "l": ["x", "y"], "n": None}
    text = config_text(values, header="two\nlines")
    assert text.startswith("# two\n# lines\n")
    assert tomllib.loads(text) == {k: v for k, v in values.items() if v is not None}


def test_a_run_writes_its_config_and_it_reruns_the_same_settings(tiny_sd_path, tiny_dataset_path, tmp_path):
    from tests.test_train import run_in_process, train_args

    out = tmp_path / "out"
    config = write(tmp_path / "run.toml", 'objective = "vanilla"\ncaption_dropout_prob = 0.25\n')
    argv = train_args(tiny_sd_path, tiny_dataset_path, out, "--config", config, steps=1)
    run_in_process(argv)
    written = out / "pogdiff_config.toml"
    assert written.is_file()
    first = parse(*argv)
    again = parse("--config", str(written))
    assert again.config_values == first.config_values
    assert (again.objective, again.caption_dropout_prob, again.output_dir) == ("vanilla", 0.25, str(out))
    record = (out / "pogdiff_run.json").read_text()
    assert '"--caption_dropout_prob": 0.25' in record


def test_the_index_command_takes_a_config_file(tmp_path, capsys):
    from pogdiff.index import parse_args

    config = write(
        tmp_path / "index.toml",
        'pretrained_model_name_or_path = "m"\ntrain_data_dir = "d"\noutput_dir = "o"\nresolution = 64\n'
        "num_neighbors = 3\n",
    )
    args = parse_args(["--config", config, "--num_neighbors", "4"])  # required flags and group from the file
    assert (args.train_data_dir, args.output_dir, args.resolution, args.num_neighbors) == ("d", "o", 64, 4)
    with pytest.raises(SystemExit):
        parse_args(["--config", write(tmp_path / "bad.toml", "learning_rate = 1e-5\n"), "--output_dir", "o"])
    assert "unknown setting 'learning_rate'" in capsys.readouterr().err
