"""evaluate_pogdiff.py end to end: tiny pipeline, tiny dataset, `pixels` features, two models."""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_pogdiff
from pogdiff.metrics import frechet_distance
from pogdiff.testing import TINY_DATASET_COUNTS, TINY_RESOLUTION, write_tiny_dataset

IMAGES = 3


def pixel_features(images_or_paths) -> np.ndarray:
    """The `pixels` extractor written out independently: 16x16 BOX thumbnail, mean-centred, unit norm."""
    rows = []
    for item in images_or_paths:
        image = item if isinstance(item, Image.Image) else Image.open(item)
        thumb = image.convert("RGB").resize((16, 16), Image.Resampling.BOX)
        vector = np.asarray(thumb, dtype=np.float64).reshape(-1) / 255.0
        vector -= vector.mean()
        rows.append(vector / np.linalg.norm(vector))
    return np.stack(rows)


def normalise(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def evaluation_dataset(argv: list[str]) -> str:
    return argv[argv.index("--train_data_dir") + 1]


def grecall_by_hand(gen: np.ndarray, train: np.ndarray, threshold: float) -> int:
    covered = set()
    for g in gen:
        sims = [float(g @ t) for t in train]
        best = int(np.argmax(sims))
        if sims[best] >= threshold:
            covered.add(best)
    return len(covered)


@pytest.fixture(scope="module")
def evaluation(tiny_sd_path, tiny_dataset_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("eval")
    argv = [
        "--model", f"first={tiny_sd_path}",
        "--model", f"second={tiny_sd_path}",
        "--train_data_dir", tiny_dataset_path,
        "--images_per_identity", str(IMAGES),
        "--num_inference_steps", "2",
        "--resolution", str(TINY_RESOLUTION),
        "--batch_size", "5",
        "--feature_extractor", "pixels",
        # Low enough that the random tiny model's images cover something.
        "--grecall_threshold", "0.05",
        "--device", "cpu",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    report = evaluate_pogdiff.main(argv)
    return argv, output_dir, report


def test_metrics_json_equals_recomputation_from_saved_images(evaluation, tiny_dataset_path):
    _, output_dir, report = evaluation
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["feature_extractor"] == "pixels16" and saved["centred_on_real_mean"] is False
    assert saved["split"]["few"] == ["chen", "dara"] and saved["split"]["all"] == [
        "alice",
        "bruno",
        "chen",
        "dara",
    ]
    assert saved["identities"]["chen"]["prompt"] == "An image of chen."
    assert saved["identities"]["alice"]["n_train"] == TINY_DATASET_COUNTS["alice"]
    assert len(set(saved["identities"]["alice"]["seeds"])) == IMAGES

    metadata = [json.loads(line) for line in open(os.path.join(tiny_dataset_path, "metadata.jsonl"))]
    for model in ("first", "second"):
        result = saved["models"][model]
        by_hand = {}
        for identity in saved["split"]["all"]:
            gen = pixel_features([output_dir / model / identity / f"{i:03d}.png" for i in range(IMAGES)])
            train_files = [row["file_name"] for row in metadata if row["identity"] == identity]
            train = pixel_features([os.path.join(tiny_dataset_path, f) for f in train_files])
            covered = grecall_by_hand(gen, train, 0.05)
            entry = result["per_identity"][identity]
            # No reference split: DINO and FID compare against the training images.
            assert entry["dino"] == pytest.approx(float((gen @ train.T).mean()), abs=1e-6)
            assert (entry["grecall_covered"], entry["grecall_total"]) == (covered, len(train_files))
            assert entry["fid"] == pytest.approx(frechet_distance(gen, train), rel=1e-4, abs=1e-6)
            by_hand[identity] = entry
        for metric in ("dino", "grecall", "fid"):
            summary = result["summary"][metric]
            assert summary["all"] == pytest.approx(np.mean([by_hand[i][metric] for i in by_hand]), abs=1e-9)
            assert summary["few"] == pytest.approx(
                np.mean([by_hand[i][metric] for i in ("chen", "dara")]), abs=1e-9
            )
            assert (summary["n_all"], summary["n_few"], summary["missing"]) == (4, 2, {})
    # Same model, same per-image seeds: the two models' images and numbers are identical.
    assert saved["models"]["first"]["summary"] == saved["models"]["second"]["summary"]
    first = np.asarray(Image.open(output_dir / "first" / "dara" / "002.png"))
    assert first.shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)
    np.testing.assert_array_equal(first, np.asarray(Image.open(output_dir / "second" / "dara" / "002.png")))


def test_markdown_table_and_grids(evaluation):
    _, output_dir, report = evaluation
    lines = (output_dir / "metrics.md").read_text().splitlines()
    header = "| Model | DINO ↑ All | DINO ↑ Few | gRecall ↑ All | gRecall ↑ Few | FID ↓ All | FID ↓ Few |"
    assert header in lines
    for model in ("first", "second"):
        summary = report["models"][model]["summary"]
        row = (
            f"| {model} | {summary['dino']['all']:.3f} | {summary['dino']['few']:.3f} | "
            f"{summary['grecall']['all']:.3f} | {summary['grecall']['few']:.3f} | "
            f"{summary['fid']['all']:.2f} | {summary['fid']['few']:.2f} |"
        )
        assert row in lines

    # One grid per identity: a row of training images (6 for alice) and a row per model.
    grid = Image.open(output_dir / "grids" / "alice.png")
    assert grid.size == (round(100 * (1.3 * 6 + 1.6)), round(100 * (1.3 * 3 + 0.5)))
    # Overview: a row per few-shot identity; 2 training images + 3 images of each of the 2 models.
    overview = Image.open(output_dir / "grid_few_shot.png")
    assert overview.size == (round(100 * (1.3 * 8 + 1.6)), round(100 * (1.3 * 2 + 0.5)))
    assert np.asarray(overview.convert("L")).std() > 10  # images were drawn, not a blank canvas


def rerun_argv(evaluation, tmp_path):
    """The fixture's command line with --output_dir on a copy of its results, so reruns leave them alone."""
    argv, output_dir, _ = evaluation
    copy = tmp_path / "rerun"
    shutil.copytree(output_dir, copy)
    return argv + ["--output_dir", str(copy)], copy


def test_rerun_reuses_images_and_takes_reference_images(evaluation, tmp_path, monkeypatch, caplog):
    argv, output_dir = rerun_argv(evaluation, tmp_path)
    first_report = evaluation[2]
    pngs = sorted(output_dir.glob("*/*/*.png"))
    assert len(pngs) == 2 * 4 * IMAGES
    mtimes = [p.stat().st_mtime_ns for p in pngs]

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline must not be loaded when every image exists")

    monkeypatch.setattr(evaluate_pogdiff.PoGDiffPipeline, "from_pretrained", no_loading)
    reference_dir = write_tiny_dataset(tmp_path / "reference", counts={"alice": 2, "chen": 1}, seed=1)
    with caplog.at_level(logging.INFO, logger="evaluate_pogdiff"):
        report = evaluate_pogdiff.main(
            argv + ["--reference_data_dir", reference_dir, "--grecall_rule", "any"]
        )
    assert "first: reusing the 12 images" in caplog.text
    assert [p.stat().st_mtime_ns for p in pngs] == mtimes

    assert reference_dir in report["real_images_for_dino_fid"] and report["grecall_rule"] == "any"
    result = report["models"]["first"]
    # Held-out images exist for alice (2) and chen (1) only.
    assert {i: report["identities"][i]["n_real"] for i in report["identities"]} == {
        "alice": 2, "bruno": 0, "chen": 1, "dara": 0,
    }  # fmt: skip
    assert result["summary"]["dino"]["n_all"] == 2 and result["summary"]["fid"]["n_all"] == 1
    assert result["summary"]["dino"]["missing"] == {"bruno": "no real images", "dara": "no real images"}
    assert "2 images on each side" in result["summary"]["fid"]["missing"]["chen"]
    assert "Left out of the means:" in (output_dir / "metrics.md").read_text()
    # gRecall always compares against training images; `any` covers at least what `nearest` covers, and
    # here more (several generated images share a nearest training image that others also resemble).
    nearest = first_report["models"]["first"]["per_identity"]
    for identity, entry in result["per_identity"].items():
        assert entry["grecall_total"] == TINY_DATASET_COUNTS[identity]
        assert entry["grecall_covered"] >= nearest[identity]["grecall_covered"]
    assert sum(e["grecall_covered"] for e in result["per_identity"].values()) > sum(
        e["grecall_covered"] for e in nearest.values()
    )
    # DINO for alice now compares against the reference images.
    gen = pixel_features([output_dir / "first" / "alice" / f"{i:03d}.png" for i in range(IMAGES)])
    ref = pixel_features(sorted((tmp_path / "reference").glob("alice_*.png")))
    assert result["per_identity"]["alice"]["dino"] == pytest.approx(float((gen @ ref.T).mean()), abs=1e-6)


def offset_pixels(images):
    """Pixel features pushed far along one direction: every pair has cosine ~1, like raw dlib vectors."""
    feats = torch.as_tensor(pixel_features(images), dtype=torch.float32)
    return feats + 10.0 * torch.ones(feats.shape[1]) / feats.shape[1] ** 0.5


offset_pixels.centre_on_real = True


def test_extractor_declaring_centre_on_real_is_centred_on_the_real_mean(evaluation, tmp_path, monkeypatch):
    argv, output_dir = rerun_argv(evaluation, tmp_path)
    monkeypatch.setattr(evaluate_pogdiff.PoGDiffPipeline, "from_pretrained", None)  # images are reused
    report = evaluate_pogdiff.main(argv + ["--feature_extractor", f"{__name__}:offset_pixels"])
    assert report["centred_on_real_mean"] is True
    assert "(centred on the real images' mean)" in (output_dir / "metrics.md").read_text()

    metadata = [json.loads(line) for line in open(os.path.join(evaluation_dataset(argv), "metadata.jsonl"))]
    raw_train = {
        identity: normalise(
            offset_pixels([os.path.join(evaluation_dataset(argv), r["file_name"]) for r in rows]).numpy()
        )
        for identity in TINY_DATASET_COUNTS
        if (rows := [r for r in metadata if r["identity"] == identity])
    }
    real_mean = np.concatenate(list(raw_train.values())).mean(0)
    gen = normalise(
        offset_pixels([output_dir / "first" / "bruno" / f"{i:03d}.png" for i in range(IMAGES)]).numpy()
    )
    assert float((gen @ raw_train["bruno"].T).mean()) > 0.98  # uncentred: everything looks alike (>= 99/101)
    centred_gen, centred_train = normalise(gen - real_mean), normalise(raw_train["bruno"] - real_mean)
    expected = float((centred_gen @ centred_train.T).mean())
    assert report["models"]["first"]["per_identity"]["bruno"]["dino"] == pytest.approx(expected, abs=1e-5)


def test_changed_generation_settings_are_refused(evaluation, tmp_path):
    argv, _ = rerun_argv(evaluation, tmp_path)
    changed = [arg if arg != "2" else "3" for arg in argv]  # --num_inference_steps 2 -> 3
    with pytest.raises(ValueError, match="num_inference_steps"):
        evaluate_pogdiff.main(changed)


@pytest.mark.parametrize("spec", ["noequals", "bad/name=x", "a=x a=y"])
def test_model_specs_are_validated(spec):
    with pytest.raises(ValueError, match="NAME=PATH|twice"):
        evaluate_pogdiff.parse_models(spec.split(" "))


def test_a_row_with_several_captions_prompts_with_its_first_caption(tiny_sd_path, tmp_path):
    """The training set is read as the trainer reads it (`data.load_training_data`): with --prompt_from caption, an
    identity whose first row holds several captions is prompted with the first of them, not their list's text."""
    data = Path(write_tiny_dataset(tmp_path / "data", counts={"alice": 2, "bruno": 2}))
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["text"] = [f"A photo of {row['identity']}.", f"{row['identity']} again."]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    evaluate_pogdiff.main(
        [
            "--model", f"m={tiny_sd_path}", "--train_data_dir", str(data), "--prompt_from", "caption",
            "--images_per_identity", "1", "--num_inference_steps", "1", "--resolution", str(TINY_RESOLUTION),
            "--feature_extractor", "pixels", "--device", "cpu", "--output_dir", str(out),
        ]
    )  # fmt: skip
    settings = json.loads(next(out.rglob("generation.json")).read_text())
    assert settings["prompts"] == {"alice": "A photo of alice.", "bruno": "A photo of bruno."}
