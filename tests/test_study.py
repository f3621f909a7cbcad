"""examples/study/run_study.py: caption attributes, aggregation and tables, and the `--size ci` run end to end."""

import importlib.util
import json
import os
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
    from pogdiff.data import PSEUDONYM_FIRST_NAMES

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


def test_split_model_judge_is_disjoint_and_seeded():
    labels = np.repeat(np.arange(3), 10)
    split = study.split_model_judge(labels, 4)
    for cls, parts in split.items():
        assert len(parts["model"]) == 4 and len(parts["judge"]) == 6
        assert set(parts["model"]).isdisjoint(parts["judge"])
        assert set(parts["model"]) | set(parts["judge"]) == set(np.flatnonzero(labels == cls).tolist())
    assert study.split_model_judge(labels, 4) == split
    with pytest.raises(ValueError, match="no judge images"):
        study.split_model_judge(labels, 10)


def test_judge_predict_and_features_use_the_hidden_layer(tmp_path, monkeypatch):
    from PIL import Image

    # Hidden unit 0 fires on the top half, unit 1 on the bottom half; class 7 <- unit 0, class 3 <- unit 1.
    w1 = np.zeros((1024, 2), dtype=np.float32)
    w1[:512, 0] = 1.0
    w1[512:, 1] = 1.0
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
    assert study.judge_features(images).tolist() == [[512.0, 0.0], [0.0, 512.0]]
    assert study.judge_features.centre_on_real is True
    monkeypatch.delenv(study.JUDGE_ENV)
    with pytest.raises(ValueError, match=study.JUDGE_ENV):
        study.judge_features(images)


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
            "accuracy": {"all": 0.5, "few": acc_few},
            "dino": {"all": 0.1, "few": 0.2},
            "grecall": {"all": 0.0, "few": None},
            "fid": {"all": fid_all, "few": 3.0},
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
    table = study.markdown_table(summary).splitlines()
    assert table[0] == (
        "| Method | Accuracy ↑ All | Accuracy ↑ Few | DINO ↑ All | DINO ↑ Few | gRecall ↑ All | gRecall ↑ Few "
        "| FID ↓ All | FID ↓ Few |"
    )
    assert table[2] == (
        "| Vanilla | 0.50 ± 0.00 | 0.25 ± 0.35 | 0.100 ± 0.000 | 0.200 ± 0.000 | 0.000 ± 0.000 | n/a "
        "| 12.00 ± 2.83 | 3.00 ± 0.00 |"
    )
    assert table[3].startswith("| PoGDiff | 0.50 ± 0.00 | 0.75 ± 0.35 |")


def test_consistency_shares_average_the_ratio_over_seeds():
    group = {
        "methods": ["vanilla", "pogdiff"],
        "training_log_means": {
            "0": {"vanilla": {"loss_main": 1.0}, "pogdiff": {"loss_main": 0.9, "loss_consistency": 0.1}},
            "1": {"pogdiff": {"loss_main": 0.7, "loss_consistency": 0.3}},
        },
    }
    assert study.consistency_shares(group) == {"pogdiff": pytest.approx(0.2)}


def _table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """Rows of the table under `heading`: method label -> cells."""
    lines = markdown.splitlines()
    start = lines.index(heading)
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.e2e
def test_ci_size_runs_end_to_end_and_resumes(tmp_path):
    results_dir, work_dir = tmp_path / "results", tmp_path / "work"
    command = [
        sys.executable,
        str(SCRIPT),
        "--size",
        "ci",
        "--output_dir",
        str(results_dir),
        "--work_dir",
        str(work_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    first = run_process_group(command, cwd=REPO, env=env, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]

    results = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    size = study.SIZES["ci"]
    assert results["seeds"] == list(size.seeds)
    assert [(g["caption_style"], g["shape"]) for g in results["groups"]] == [
        (style, shape) for style in size.methods for shape in size.shapes
    ]
    # The judge is a real classifier: far above chance (0.1) on held-out real digits.
    assert results["judge"]["heldout_accuracy"] > 0.8
    for group in results["groups"]:
        assert group["methods"] == list(size.methods[group["caption_style"]])
        assert sorted(group["dataset"]["train_counts"].values()) == [2, 30]
        rows = _table_rows(markdown, f"## Shape {group['shape']}, captions `{group['caption_style']}`")
        assert list(rows) == [study.METHOD_LABELS[m] for m in group["methods"]]
        for method in group["methods"]:
            expected = [
                study.format_cell(group["summary"][method][metric][shot], digits)
                for metric, _, _, digits in study.METRIC_COLUMNS
                for shot in study.SHOT_GROUPS
            ]
            assert rows[study.METHOD_LABELS[method]] == expected
            for seed in results["seeds"]:
                logs = group["training_log_means"][str(seed)][method]
                assert ("loss_consistency" in logs) == method.startswith("pogdiff")
                accuracy = group["per_seed"][str(seed)][method]["accuracy"]
                assert 0.0 <= accuracy["all"] <= 1.0 and 0.0 <= accuracy["few"] <= 1.0
    for style in size.methods:
        assert (results_dir / f"grid_few_shot_{style}-S.png").is_file()
    assert (results_dir / "psi.png").is_file()
    # Rare captions weigh more (inverse text density): minority samples get the larger psi.
    for psi in results["psi"].values():
        assert psi["expected_psi"]["minority"]["mean"] > psi["expected_psi"]["majority"]["mean"]
        assert psi["effective_psi"]["majority"]["mean"] <= psi["expected_psi"]["majority"]["mean"]

    # A rerun skips every finished run and reuses the generated images: the same numbers come back.
    second = run_process_group(command, cwd=REPO, env=env, timeout=1800)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    assert [g["summary"] for g in again["groups"]] == [g["summary"] for g in results["groups"]]
    assert "reusing the" in second.stderr
