"""Training that shows the minority while it learns (--validation_steps, automatic prompts, labelled grids) and
kohya-style folders in (--caption_extension), through the real trainer on the tiny model."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import run_in_process, train_args

from pogdiff.data import load_image_text_dataset
from pogdiff.validation import auto_validation_prompts, validation_grid_layout


def tensorboard_images(folder: Path, tag: str) -> list[tuple[int, np.ndarray]]:
    """(step, HWC uint8 image) of every image the run logged to TensorBoard under `tag`."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = []
    for path in sorted((folder / "logs").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"images": 0})
        events.Reload()
        if tag in events.Tags()["images"]:
            for event in events.Images(tag):
                found.append((event.step, np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))))
    return sorted(found, key=lambda pair: pair[0])


def test_validation_steps_watch_majority_and_few_shot_with_fixed_noise(
    tiny_sd_path, tiny_dataset_path, tmp_path
):
    """--validation_steps without prompts: a grid per validation with two majority and two few-shot identities,
    each row labelled and showing its training images; with lr 0 the model does not move, so fixed seeds must
    make the grids of step 1 and step 2 identical pixel for pixel."""
    out = tmp_path / "out"
    argv = train_args(tiny_sd_path, tiny_dataset_path, out, "--objective", "vanilla", steps=2)
    argv[argv.index("--learning_rate") + 1] = "0"
    run_in_process(
        [
            *argv,
            "--validation_steps",
            "1",
            "--num_validation_images",
            "2",
            "--num_validation_inference_steps",
            "2",
        ]
    )
    grids = sorted((out / "validation").iterdir())
    assert [p.name for p in grids] == ["step-000001.png", "step-000002.png"]
    first, second = (np.asarray(Image.open(p)) for p in grids)

    # The rows the trainer chose: alice, bruno (6 images each) then chen, dara (2 each, few-shot).
    dataset = load_image_text_dataset(train_data_dir=tiny_dataset_path)
    prompts = auto_validation_prompts(list(dataset["identity"]), list(dataset["text"]), few_shot_max=2)
    assert [(p.identity, p.num_train_images, p.few_shot) for p in prompts] == [
        ("alice", 6, False), ("bruno", 6, False), ("chen", 2, True), ("dara", 2, True),
    ]  # fmt: skip
    sample = Image.new("RGB", (32, 32))
    train = Image.new("RGB", (32, 32))
    layout = validation_grid_layout(
        [(p, [train] * min(3, p.num_train_images), [sample, sample]) for p in prompts],
        cell=128,  # the trainer's smallest cell: the 32-pixel images are enlarged
        max_train_images=3,
        title="step 1",
    )
    assert Image.open(grids[0]).size == layout.size
    assert len(layout.samples[0]) == 2 and len(layout.train[0]) == 3
    # Same seeds at every validation: every sample cell of step 2 equals step 1's (only the title differs).
    for row in layout.samples:
        for left, top, right, bottom in row:
            assert np.array_equal(first[top:bottom, left:right], second[top:bottom, left:right])
    # ... and two images of one prompt use different seeds.
    (l0, t0, r0, b0), (l1, t1, r1, b1) = layout.samples[0]
    assert not np.array_equal(first[t0:b0, l0:r0], first[t1:b1, l1:r1])
    # The training images are shown beside the samples: alice's first image fills her first train cell.
    alice = Image.open(Path(tiny_dataset_path) / "alice_000.png").convert("RGB")
    left, top, right, bottom = layout.train[0][0]
    enlarged = np.asarray(alice.resize((right - left, bottom - top), Image.Resampling.LANCZOS))
    assert np.array_equal(first[top:bottom, left:right], enlarged)

    logged = tensorboard_images(out, "validation")
    assert [step for step, _ in logged] == [1, 2]
    assert logged[0][1].shape == first.shape


def test_no_validation_flags_means_no_validation(tiny_sd_path, tiny_dataset_path, tmp_path):
    """A user who changes nothing gets upstream's behaviour: no prompts, no validation."""
    out = tmp_path / "out"
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, out, "--objective", "vanilla", steps=1))
    assert not (out / "validation").exists()


def write_kohya_folder(source: str, target: Path) -> Path:
    """The tiny dataset as kohya lays it out: `5_chen/` (2 images, 5 repeats) and `alice/` (6 images), a .txt
    caption beside each image."""
    rows = [json.loads(line) for line in (Path(source) / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        folder = {"chen": "5_chen", "alice": "alice"}.get(row["identity"])
        if folder is None:
            continue
        (target / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(source) / row["file_name"], target / folder / row["file_name"])
        (target / folder / row["file_name"]).with_suffix(".txt").write_text(row["text"] + "\n")
    return target


def test_kohya_folder_trains_with_its_repeats(tiny_sd_path, tiny_dataset_path, tmp_path):
    data = write_kohya_folder(tiny_dataset_path, tmp_path / "kohya")
    out = tmp_path / "out"
    argv = train_args(tiny_sd_path, str(data), out, "--objective", "vanilla", steps=10)
    run_in_process([*argv, "--caption_extension", ".txt"])
    counts = json.loads((out / "sample_counts.json").read_text())
    assert counts["images_per_identity"] == {"alice": 6, "chen": 2}
    drawn = counts["samples_per_identity"]
    assert sum(drawn.values()) == 40
    # Weight per image: chen 5, alice 1, so chen's expected share is 10 / 16 (uniform would give 2 / 8). With 40
    # draws, 4 binomial standard deviations below 10 / 16 is still far above 2 / 8.
    share = drawn["chen"] / 40
    assert share > 10 / 16 - 4 * (10 / 16 * 6 / 16 / 40) ** 0.5 > 0.25


def test_kohya_folder_needs_train_data_dir(tiny_sd_path, capsys):
    import train_pogdiff

    with pytest.raises(SystemExit) as exit_info:
        train_pogdiff.parse_args(
            [
                "--pretrained_model_name_or_path",
                tiny_sd_path,
                "--dataset_name",
                "x",
                "--caption_extension",
                ".txt",
            ]
        )
    assert exit_info.value.code == 2
    assert "--caption_extension reads a --train_data_dir folder" in capsys.readouterr().err
