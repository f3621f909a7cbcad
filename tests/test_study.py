"""examples/study/run_study.py: caption attributes, aggregation and tables, and the `--size ci` run end to end."""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pogdiff.testing import run_process_group

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "study" / "run_study.py"


def _load_study():
    spec = importlib.util.spec_from_file_location("run_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body runs.
    sys.modules["run_study"] = module
    spec.loader.exec_module(module)
    return module


study = _load_study()


def test_stroke_attributes_of_a_vertical_bar():
    image = np.zeros((28, 28), dtype=np.uint8)
    image[4:24, 13:15] = 255  # 20 rows x 2 columns of ink
    attributes = study.stroke_attributes(image)
    assert attributes["ink"] == pytest.approx(40 / 784)
    assert attributes["slant"] == pytest.approx(0.0, abs=1e-12)
    assert attributes["width"] == pytest.approx(2 / 20)


def test_stroke_attributes_slant_sign_follows_the_top_of_the_digit():
    # x = 27 - y: the top row holds the rightmost pixel, so the stroke leans right; x moves one column per
    # row, so the shear -mu11/mu02 is exactly 1.
    leaning_right = np.zeros((28, 28), dtype=np.uint8)
    leaning_right[np.arange(28), 27 - np.arange(28)] = 255
    right = study.stroke_attributes(leaning_right)
    assert right["slant"] == pytest.approx(1.0)
    assert right["ink"] == pytest.approx(28 / 784)
    assert right["width"] == pytest.approx(1.0)
    assert study.stroke_attributes(leaning_right[:, ::-1])["slant"] == pytest.approx(-1.0)


def test_stroke_attributes_rejects_an_empty_image():
    with pytest.raises(ValueError, match="empty"):
        study.stroke_attributes(np.zeros((28, 28), dtype=np.uint8))


def test_attribute_thresholds_and_describe():
    attributes = [{"ink": i / 10, "slant": (i - 4) / 4, "width": i / 8} for i in range(9)]
    thresholds = study.attribute_thresholds(attributes)
    # Terciles of 0..0.8 (numpy's linear interpolation) and the median of 0..1.
    assert thresholds["ink"] == pytest.approx([0.8 / 3, 1.6 / 3])
    assert thresholds["slant"] == pytest.approx([-1 / 3, 1 / 3])
    assert thresholds["width"] == pytest.approx([0.5])
    assert study.describe({"ink": 0.1, "slant": 0.9, "width": 0.2}, thresholds) == (
        "thin strokes, slanted right, narrow"
    )
    assert study.describe({"ink": 0.4, "slant": 0.0, "width": 0.5}, thresholds) == (
        "medium strokes, upright, wide"
    )
    assert study.describe({"ink": 0.7, "slant": -0.5, "width": 0.9}, thresholds) == (
        "thick strokes, slanted left, wide"
    )


def test_captions_fit_the_text_encoder_for_every_pseudonym_and_description():
    # The tiny CLIP tokenizer spends one token per non-space character and holds 77 with start/end tokens:
    # a longer caption would silently lose its last attributes.
    from pogdiff.longtail import PSEUDONYM_FIRST_NAMES

    longest_name = max(PSEUDONYM_FIRST_NAMES, key=len)
    longest = max(
        (
            f"{s} strokes, {t}, {w}"
            for s in study.STROKE_WORDS
            for t in study.SLANT_WORDS
            for w in study.WIDTH_WORDS
        ),
        key=lambda text: len(text.replace(" ", "")),
    )
    text = study.caption(longest_name, longest)
    assert text.startswith(f"An image of {longest_name}, ")
    assert len(text.replace(" ", "")) <= 75
    assert study.caption("Lukas", None) == "An image of Lukas."


def test_split_classes_is_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 40)
    split = study.split_classes(labels, judge_per_class=4, validation_per_class=5)
    for cls, parts in split.items():
        n_validation = 5 if cls in study.EVAL_CLASSES else 0
        assert (len(parts["judge"]), len(parts["validation"])) == (4, n_validation)
        assert len(parts["model"]) == 40 - 4 - n_validation
        assert set(parts["model"]).isdisjoint(parts["judge"]) and set(parts["model"]).isdisjoint(
            parts["validation"]
        )
        assert set(parts["judge"]).isdisjoint(parts["validation"])
        assert set(parts["model"]) | set(parts["judge"]) | set(parts["validation"]) == set(
            np.flatnonzero(labels == cls).tolist()
        )
    assert study.split_classes(labels, 4, 5) == split
    with pytest.raises(ValueError, match="too few"):
        study.split_classes(labels, 10, 5)


def test_judge_predict_and_features_use_the_hidden_layer(tmp_path, monkeypatch):
    from PIL import Image

    # On the judge's 8x8 grid: hidden unit 0 fires on the top half, unit 1 on the bottom half;
    # class 7 <- unit 0, class 3 <- unit 1.
    w1 = np.zeros((64, 2), dtype=np.float32)
    w1[:32, 0] = 1.0
    w1[32:, 1] = 1.0
    weights = {
        "w1": w1,
        "b1": np.zeros(2, np.float32),
        "w2": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),
        "b2": np.zeros(2, np.float32),
        "classes": np.array([7, 3]),
    }
    top = np.zeros((32, 32), np.uint8)
    top[:16] = 255
    images = [Image.fromarray(top).convert("RGB"), Image.fromarray(top[::-1].copy()).convert("RGB")]
    assert study.judge_predict(weights, images).tolist() == [7, 3]

    path = tmp_path / "judge.npz"
    np.savez(path, **weights)
    monkeypatch.setenv(study.JUDGE_ENV, str(path))
    assert study.judge_features(images).tolist() == [[32.0, 0.0], [0.0, 32.0]]
    assert study.judge_features.centre_on_real is True
    monkeypatch.delenv(study.JUDGE_ENV)
    with pytest.raises(ValueError, match=study.JUDGE_ENV):
        study.judge_features(images)


def test_regime_check():
    assert study.regime_check(0.8, 0.1)["informative"] is True
    assert study.regime_check(0.8, 0.55)["informative"] is False  # the minority is learned too
    assert study.regime_check(0.65, 0.0)["informative"] is False  # the majority is not learned
    assert study.regime_check(0.7, 0.4)["informative"] is True  # both bounds are inclusive
    assert study.regime_check(None, 0.0)["informative"] is False


def test_diagnostics_means_and_consistency_share():
    series = {
        "loss_main": [0.9, 0.8, 0.5, 0.5],
        "loss_consistency": [0.1, 0.2, 0.5, 0.5],
        "psi_minority": [1.0, 2.0, 3.0, 6.0],
    }
    d = study.diagnostics(series)
    assert d["psi_minority_mean"] == 3.0 and d["psi_minority_last_quarter"] == 6.0
    # Per-step shares 0.1, 0.2, 0.5, 0.5.
    assert d["consistency_share_mean"] == pytest.approx(0.325)
    assert d["consistency_share_last_quarter"] == pytest.approx(0.5)


def test_seed_metrics_groups_many_and_few():
    report = {
        "split": {"all": ["a", "b", "c"], "few": ["c"]},
        "identities": {"a": {}, "b": {}, "c": {}},
        "models": {
            "m": {
                "accuracy_per_identity": {"a": 1.0, "b": 0.5, "c": 0.25},
                "per_identity": {
                    "a": {"dino": 0.2, "grecall": 0.1, "fid": 1.0},
                    "b": {"dino": 0.4, "grecall": 0.3, "fid": None},
                    "c": {"dino": -0.1, "grecall": 0.0, "fid": 3.0},
                },
            }
        },
    }
    m = study.seed_metrics(report, "m")
    assert m["accuracy"] == {"all": 0.5833333333333334, "many": 0.75, "few": 0.25}
    assert m["dino"]["many"] == pytest.approx(0.3) and m["fid"] == {"all": 2.0, "many": 1.0, "few": 3.0}


def test_mean_std_and_cells():
    assert study.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert study.mean_std([None, 4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    assert study.mean_std([None]) == {"mean": None, "std": None, "n": 0}
    assert study.format_cell({"mean": 0.5234, "std": 0.0412, "n": 3}, 2) == "0.52 ± 0.04"
    assert study.format_cell({"mean": 0.5234, "std": 0.0, "n": 1}, 3) == "0.523"
    assert study.format_cell({"mean": None, "std": None, "n": 0}, 2) == "n/a"


def test_summarize_group_and_markdown_table():
    def numbers(acc_few, fid_all):
        return {
            "accuracy": {"all": 0.5, "many": 0.75, "few": acc_few},
            "dino": {"all": 0.1, "many": 0.1, "few": 0.2},
            "grecall": {"all": 0.0, "many": 0.0, "few": None},
            "fid": {"all": fid_all, "many": 1.0, "few": 3.0},
        }

    per_seed = {
        "0": {"vanilla": numbers(0.0, 10.0), "pogdiff": numbers(0.5, 12.0)},
        "1": {"vanilla": numbers(0.5, 14.0), "pogdiff": numbers(1.0, 12.0)},
    }
    summary = study.summarize_group(per_seed)
    assert list(summary) == ["vanilla", "pogdiff"]
    assert summary["vanilla"]["accuracy"]["few"] == {"mean": 0.25, "std": pytest.approx(0.5**0.5 / 2), "n": 2}
    assert summary["pogdiff"]["fid"]["all"] == {"mean": 12.0, "std": 0.0, "n": 2}
    assert summary["vanilla"]["grecall"]["few"]["mean"] is None
    table = study.markdown_table(summary, {"pogdiff": "PoGDiff (x)"}).splitlines()
    assert table[0] == (
        "| Method | Accuracy ↑ All | Accuracy ↑ Many | Accuracy ↑ Few | DINO ↑ All | DINO ↑ Many | DINO ↑ Few "
        "| gRecall ↑ All | gRecall ↑ Many | gRecall ↑ Few | FID ↓ All | FID ↓ Many | FID ↓ Few |"
    )
    assert table[2] == (
        "| Vanilla | 0.50 ± 0.00 | 0.75 ± 0.00 | 0.25 ± 0.35 | 0.100 ± 0.000 | 0.100 ± 0.000 | 0.200 ± 0.000 "
        "| 0.000 ± 0.000 | 0.000 ± 0.000 | n/a | 12.00 ± 2.83 | 1.00 ± 0.00 | 3.00 ± 0.00 |"
    )
    assert table[3].startswith("| PoGDiff (x) | 0.50 ± 0.00 | 0.75 ± 0.00 | 0.75 ± 0.35 |")


def test_tradeoff_settings_cover_each_dial_at_each_budget():
    size = study.SIZES["full"]
    settings = study.tradeoff_settings(size)
    assert [(s.key, s.factor) for s in settings[:6]] == [
        ("uniform-x1", 1), ("power0.5-x1", 1), ("power0.25-x1", 1), ("power0-x1", 1),
        ("density-w2-x1", 1), ("density-w4-x1", 1),
    ]  # fmt: skip
    assert len(settings) == 12 and [s.factor for s in settings[6:]] == [2] * 6
    assert settings[0].flags == () and settings[2].flags == ("--sampling_power", "0.25")
    assert settings[4].flags == ("--sampling", "density", "--density_w_max", "2")
    assert settings[2].dial == "--sampling_power 0.25"
    # Every setting's flags are flags the trainer accepts, with the value it parses back.
    from train_pogdiff import parse_args

    for setting in settings:
        parsed = parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *setting.flags])
        if "--sampling_power" in setting.flags:
            assert parsed.sampling_power == float(setting.flags[1])
        if "--density_w_max" in setting.flags:
            assert (parsed.sampling, parsed.density_w_max) == ("density", float(setting.flags[3]))


def _setting(key, factor, flags=("--x",)):
    return study.Setting(key, key, tuple(flags), factor)


def test_tradeoff_rows_cost_against_vanilla_at_the_same_budget_and_the_rule():
    settings = [
        _setting("v1", 1, ()), _setting("a1", 1), _setting("b1", 1),
        _setting("v2", 2, ()), _setting("a2", 2), _setting("c2", 2),
    ]  # fmt: skip
    accuracy = {
        "v1": {"many": 0.90, "few": 0.10},
        "a1": {"many": 0.86, "few": 0.78},  # cost 0.04, gap 0.08: meets
        "b1": {"many": 0.80, "few": 0.75},  # cost 0.10: misses by 0.05
        "v2": {"many": 0.80, "few": 0.20},
        "a2": {"many": 0.78, "few": 0.78},  # against vanilla x2: cost 0.02, gap 0: meets, same few as a1
        "c2": {"many": None, "few": 0.5},
    }
    rows = {r["key"]: r for r in study.tradeoff_rows(accuracy, settings)}
    assert rows["a1"]["cost"] == pytest.approx(0.04) and rows["a1"]["gap"] == pytest.approx(0.08)
    assert rows["a1"]["meets"] and rows["a2"]["meets"] and rows["a2"]["cost"] == pytest.approx(0.02)
    assert not rows["b1"]["meets"] and rows["b1"]["shortfall"] == pytest.approx(0.05)
    assert rows["v1"]["cost"] == 0.0 and rows["v1"]["shortfall"] == pytest.approx(0.7)
    assert rows["c2"]["shortfall"] is None and not rows["c2"]["meets"]
    # Equal few-shot accuracy: the smaller budget wins.
    assert study.choose_setting(list(rows.values()))["key"] == "a1"
    # Nothing meets the target: the smallest shortfall wins.
    rows["a1"]["meets"] = rows["a2"]["meets"] = False
    rows["a1"]["shortfall"], rows["a2"]["shortfall"] = 0.2, 0.3
    assert study.choose_setting(list(rows.values()))["key"] == "b1"


def _table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """Rows of the first table under `heading` (the results; the diagnostics table follows it): label -> cells."""
    lines = markdown.splitlines()
    start = lines.index(heading)
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("#") or (rows and not line.startswith("|")):
            break
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def ci_study_command(tmp_path: Path) -> tuple[list[str], Path, Path]:
    """`run_study.py --size ci --jobs 2` (the process pool) into tmp_path: the command, results and work dirs."""
    results_dir, work_dir = tmp_path / "results", tmp_path / "work"
    command = [
        sys.executable, str(SCRIPT), "--size", "ci", "--jobs", "2",
        "--output_dir", str(results_dir), "--work_dir", str(work_dir),
    ]  # fmt: skip
    return command, results_dir, work_dir


STUDY_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.e2e
@pytest.mark.long(seconds=590)
def test_ci_size_runs_end_to_end_resumes_and_maps_the_tradeoff(tmp_path):
    """The study (v2's methods part) at `--size ci`, then again: the rerun finds every run, the pilot and every
    image done and reproduces the numbers. Then v3's trade-off map, on the same base and pilot."""
    command, results_dir, work_dir = ci_study_command(tmp_path)
    first = run_process_group(command, cwd=REPO, env=STUDY_ENV, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    results = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    size = study.SIZES["ci"]
    assert results["seeds"] == list(size.seeds)
    assert [(g["caption_style"], g["shape"]) for g in results["groups"]] == [
        (style, shape) for style in size.methods for shape in size.shapes
    ]
    # The judge is a real classifier: far above chance (0.1) on held-out real digits.
    assert results["judge"]["heldout_accuracy"] > 0.8
    pilot = results["pilot"]
    assert [(b["learning_rate"], b["steps"]) for b in pilot["budgets"]] == list(size.pilot_budgets)
    assert (pilot["psi_choice"]["a2"], pilot["psi_choice"]["a3"]) in size.psi_grid
    assert pilot["sampling_choice"]["sampling"] in size.pilot_samplings
    labels = study.method_labels(pilot)
    for group in results["groups"]:
        assert group["methods"] == list(size.methods[group["caption_style"]])
        assert sorted(group["dataset"]["train_counts"].values()) == [2, 30]
        heading = f"## Shape {group['shape']}, captions `{group['caption_style']}`"
        section = markdown[markdown.index(heading) :]
        # Vanilla's regime is checked and said before the table; the ci budget cannot reach it.
        assert ("uninformative regime" in section.split("| Method")[0]) is not group["regime"]["informative"]
        rows = _table_rows(markdown, heading)
        assert list(rows)[: len(group["methods"])] == [labels[m] for m in group["methods"]]
        for method in group["methods"]:
            expected = [
                study.format_cell(group["summary"][method][metric][shot], digits)
                for metric, _, _, digits in study.METRIC_COLUMNS
                for shot in study.SHOT_GROUPS
            ]
            assert rows[labels[method]] == expected
            for seed in results["seeds"]:
                diag = group["diagnostics"][str(seed)][method]
                assert ("consistency_share_mean" in diag) == method.startswith("pogdiff")
                if method.startswith("pogdiff"):
                    assert 0.0 <= diag["neighbor_same_identity_mean"] <= 1.0
                accuracy = group["per_seed"][str(seed)][method]["accuracy"]
                assert all(0.0 <= accuracy[g] <= 1.0 for g in study.SHOT_GROUPS)
        if "pogdiff-ngrad" in group["methods"]:
            assert group["flags"]["pogdiff-ngrad"] == ["--objective", "pogdiff", "--neighbor_grad"]
    for style in size.methods:
        assert (results_dir / f"grid_few_shot_{style}-S.png").is_file()
        assert (results_dir / f"tradeoff_{style}-S.png").is_file()
    assert (results_dir / "psi.png").is_file() and (results_dir / "pilot.json").is_file()
    # Rare captions weigh more (inverse text density): minority samples get the larger psi.
    for psi in results["psi"].values():
        assert psi["expected_psi"]["minority"]["mean"] > psi["expected_psi"]["majority"]["mean"]
        assert psi["effective_psi"]["majority"]["mean"] <= psi["expected_psi"]["majority"]["mean"]

    # A rerun skips every finished run and reuses the generated images: the same numbers come back.
    second = run_process_group(command, cwd=REPO, env=STUDY_ENV, timeout=1800)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    assert [g["summary"] for g in again["groups"]] == [g["summary"] for g in results["groups"]]
    assert again["pilot"] == results["pilot"]

    # v3, the trade-off map: every setting on the validation side once and on the evaluated set per seed.
    tradeoff = run_process_group([*command, "--part", "tradeoff"], cwd=REPO, env=STUDY_ENV, timeout=1800)
    assert tradeoff.returncode == 0, tradeoff.stdout[-3000:] + tradeoff.stderr[-3000:]
    mapped = json.loads((results_dir / "tradeoff.json").read_text(encoding="utf-8"))
    keys = [s.key for s in study.tradeoff_settings(size)]
    assert [r["key"] for r in mapped["validation"]["rows"]] == keys
    assert mapped["validation"]["chosen"]["key"] in keys
    assert mapped["pilot"]["budget"] == results["pilot"]["budget"]  # the methods part's pilot, reused
    assert [list(g["summary"]) for g in mapped["groups"]] == [keys]
    assert mapped["cost"]["fine_tunes"] == mapped["cost"]["trained_now"] == len(keys) * (1 + len(size.seeds))
    markdown = (results_dir / "tradeoff.md").read_text(encoding="utf-8")
    assert f"Chosen: **{mapped['validation']['chosen']['dial']}" in markdown
    assert (results_dir / "tradeoff_front_template-S.png").is_file()


@pytest.mark.e2e
@pytest.mark.long(seconds=280)
def test_ci_size_per_image_part_reproduces_from_scratch(tmp_path):
    """v3's per-image captions on a base with a trained text encoder, in a work dir of its own (data and judge
    built by the part itself); then everything of that part again from scratch (base, pilot, runs, images): same
    seed, same machine, same numbers."""
    command, results_dir, work_dir = ci_study_command(tmp_path)
    size = study.SIZES["ci"]

    def per_image() -> dict:
        proc = run_process_group([*command, "--part", "per-image"], cwd=REPO, env=STUDY_ENV, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads((results_dir / "per_image.json").read_text(encoding="utf-8"))

    first_pi = per_image()
    assert first_pi["base_model"]["unet"]["text_encoder"] == "trained with the UNet"
    assert [g["methods"] for g in first_pi["groups"]] == [list(size.per_image_methods)]
    assert "## Shape S, captions `attr`" in (results_dir / "per_image.md").read_text(encoding="utf-8")
    shutil.rmtree(work_dir / "per-image")
    shutil.rmtree(work_dir / "base-model-te")
    second_pi = per_image()
    assert (
        second_pi["cost"]["trained_now"] == second_pi["cost"]["fine_tunes"] == first_pi["cost"]["fine_tunes"]
    )
    assert second_pi["base_model"]["unet"] == first_pi["base_model"]["unet"]
    assert second_pi["pilot"]["budgets"] == first_pi["pilot"]["budgets"]
    for key in ("summary", "per_seed", "diagnostics"):
        assert [g[key] for g in second_pi["groups"]] == [g[key] for g in first_pi["groups"]], key
