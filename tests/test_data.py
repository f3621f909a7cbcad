"""pogdiff.data (loading/validation, the torchvision-free transform) and pogdiff.longtail (the long-tail builder)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pogdiff.data import (
    check_identities,
    dataset_fingerprint,
    identity_labels,
    load_image_text_dataset,
    load_rgb,
    preprocess_image,
    resolve_columns,
    row_image_loader,
)
from pogdiff.errors import UserError
from pogdiff.longtail import (
    PAPER_TOTALS,
    PRESETS,
    PSEUDONYM_FIRST_NAMES,
    NameMasker,
    assign_pseudonyms,
    build_longtail_dataset,
    longtail_targets,
    main,
    name_parts,
    parse_agedb_filename,
)

# AgeDB-style identities and how many images each has.
AGEDB_COUNTS = {
    "RonaldReagan": 8,
    "AlbertEinstein": 6,
    "JWMarriott": 4,
    "LuiseRainer": 3,
    "EdwardGRobinson": 1,
}


def _square(colour, size=8):
    return Image.new("RGB", (size, size), colour)


def _write_agedb(folder: Path) -> Path:
    """Tiny coloured squares named like AgeDB: `<id>_<Name>_<age>_<gender>.png`."""
    folder.mkdir(parents=True)
    image_id = 0
    for k, (name, n) in enumerate(AGEDB_COUNTS.items()):
        for i in range(n):
            _square((30 * k, 20 * i, 100)).save(folder / f"{image_id}_{name}_{20 + i}_{'mf'[k % 2]}.png")
            image_id += 1
    return folder


def _read_metadata(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text().splitlines()]


def _build(image_dir, out, **kwargs):
    options = {
        "identity_from": "agedb",
        "majority_ids": 2,
        "majority_images": 5,
        "minority_ids": 2,
        "minority_images": 2,
        "show_progress": False,
    }
    options.update(kwargs)
    return build_longtail_dataset(str(out), image_dir=str(image_dir), **options)


@pytest.fixture(scope="module")
def agedb_dir(tmp_path_factory):
    return _write_agedb(tmp_path_factory.mktemp("agedb") / "AgeDB")


@pytest.fixture(scope="module")
def built(agedb_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "it2i"
    return out, _build(agedb_dir, out, seed=0)


# ------------------------------------------------------------------------------------------------ AgeDB names


def test_agedb_filename_parses_and_rejects_other_names(agedb_dir, tmp_path):
    assert parse_agedb_filename("715_RonaldReagan_53_m.jpg") == {
        "image_id": 715,
        "identity": "RonaldReagan",
        "age": 53,
        "gender": "m",
    }
    assert parse_agedb_filename("some/dir/3_Mary_Ann_Smith_7_F.JPG")["identity"] == "Mary_Ann_Smith"
    for bad in ("RonaldReagan_53_m.jpg", "715_RonaldReagan_53_x.jpg", "715_RonaldReagan_m.jpg"):
        with pytest.raises(ValueError, match=re.escape(bad)):
            parse_agedb_filename(bad)

    # The builder rejects a stray file by name instead of skipping it.
    stray = tmp_path / "agedb"
    stray.mkdir()
    for path in agedb_dir.iterdir():
        (stray / path.name).write_bytes(path.read_bytes())
    _square((0, 0, 0)).save(stray / "holiday.png")
    with pytest.raises(ValueError, match="holiday.png"):
        _build(stray, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- long-tail shape


def test_presets_and_power_law_targets():
    realised = {
        k: (p["majority_ids"] + p["minority_ids"], sum(longtail_targets(**p))) for k, p in PRESETS.items()
    }
    # S matches the paper exactly; M and L keep the identity count and get as close in images as 30s/2s allow.
    assert realised == {"S": (2, 32), "M": (10, 104), "L": (223, 978)}
    assert {k: v["identities"] for k, v in PAPER_TOTALS.items()} == {"S": 2, "M": 10, "L": 223}
    # 976 = 30a + 2(223 - a) has no integer solution (28a = 530): 978 (a = 19) is the nearest.
    assert abs(19 * 30 + 204 * 2 - 976) < abs(18 * 30 + 205 * 2 - 976)
    assert longtail_targets(power_law=1.0, max_images=30, min_images=2, num_ids=8) == [
        30,
        15,
        10,
        8,
        6,
        5,
        4,
        4,
    ]
    assert longtail_targets(power_law=2.0, max_images=30, min_images=2, num_ids=5) == [30, 8, 3, 2, 2]


def test_builder_gives_exact_counts_and_leftovers_as_reference(built, agedb_dir):
    out, summary = built
    rows = _read_metadata(out)
    names = json.loads((out / "names.json").read_text())  # pseudonym -> real name
    sources = json.loads((out / "sources.json").read_text())  # output file -> source file
    real_of_row = [names[row["identity"]] for row in rows]

    # most_images: the two identities with most images are the majority; the next two the minority.
    train = {
        real: sum(1 for r, row in zip(real_of_row, rows) if r == real and row["split"] == "train")
        for real in names.values()
    }
    assert train == {"RonaldReagan": 5, "AlbertEinstein": 5, "JWMarriott": 2, "LuiseRainer": 2}
    assert summary["num_identities"] == 4
    assert summary["num_train_images"] == 14
    assert summary["num_reference_images"] == (8 - 5) + (6 - 5) + (4 - 2) + (3 - 2)
    assert sorted(summary["train_counts"].values()) == [2, 2, 5, 5]
    assert {row["split"] for row in rows} == {"train", "reference"}

    # Reference = exactly the unused images of each chosen identity, disjoint from training.
    for real in names.values():
        own = {sources[row["file_name"]] for r, row in zip(real_of_row, rows) if r == real}
        train_files = {
            sources[row["file_name"]]
            for r, row in zip(real_of_row, rows)
            if r == real and row["split"] == "train"
        }
        ref_files = {
            sources[row["file_name"]]
            for r, row in zip(real_of_row, rows)
            if r == real and row["split"] == "reference"
        }
        assert not train_files & ref_files
        assert own == {str(p) for p in agedb_dir.glob(f"*_{real}_*")}
    # Images are copied byte for byte.
    first = rows[0]["file_name"]
    assert (out / first).read_bytes() == Path(sources[first]).read_bytes()
    assert Image.open(out / "identity_histogram.png").size[0] > 100


def test_same_seed_same_bytes_other_seed_other_images(agedb_dir, built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    _build(agedb_dir, again, seed=0)
    assert (again / "metadata.jsonl").read_bytes() == (out / "metadata.jsonl").read_bytes()
    assert (again / "sources.json").read_bytes() == (out / "sources.json").read_bytes()

    def picked(folder):
        sources = json.loads((folder / "sources.json").read_text())
        return {sources[r["file_name"]] for r in _read_metadata(folder) if r["split"] == "train"}

    others = []
    for seed in (1, 2, 3):
        _build(agedb_dir, tmp_path / f"seed{seed}", seed=seed)
        others.append(picked(tmp_path / f"seed{seed}"))
    assert any(p != picked(out) for p in others)
    assert all(len(p) == 14 for p in others)


def test_too_few_images_is_an_error_naming_the_identity(agedb_dir, tmp_path):
    with pytest.raises(ValueError, match=r"'AlbertEinstein' has 6 images, fewer than the 7"):
        _build(agedb_dir, tmp_path / "a", majority_images=7)
    with pytest.raises(ValueError, match=r"'EdwardGRobinson' has 1 images, fewer than the 2"):
        _build(agedb_dir, tmp_path / "b", majority_ids=1, minority_ids=4)
    with pytest.raises(ValueError, match="only 5"):
        _build(agedb_dir, tmp_path / "c", majority_ids=3, minority_ids=3)
    assert not (tmp_path / "a").exists()  # nothing is written before the shape is known to fit


def test_random_selection_is_seeded(agedb_dir, tmp_path):
    a = _build(agedb_dir, tmp_path / "a", majority_ids=1, minority_ids=1, selection="random", seed=4)
    b = _build(agedb_dir, tmp_path / "b", majority_ids=1, minority_ids=1, selection="random", seed=4)
    assert a["train_counts"] == b["train_counts"]
    assert sorted(a["train_counts"].values()) == [2, 5]


# ----------------------------------------------------------------------------------------------- name masking


def test_pseudonyms_are_stable_unique_and_not_real_names():
    people = ["RonaldReagan", "AlbertEinstein", "JWMarriott", "LuiseRainer"]
    first = assign_pseudonyms(people, seed=0)
    assert assign_pseudonyms(list(reversed(people)), seed=0) == first
    assert assign_pseudonyms(people[:2], seed=0) == {p: first[p] for p in people[:2]}
    assert len(set(first.values())) == 4
    assert all(v in PSEUDONYM_FIRST_NAMES for v in first.values())
    assert assign_pseudonyms(people, seed=1) != first

    # More identities than first names: still unique, "First Last" pairs fill up, no real name word used.
    many = [f"Person{i:04d}" for i in range(len(PSEUDONYM_FIRST_NAMES) + 50)] + ["LukasBerg"]
    crowd = assign_pseudonyms(many, seed=0)
    assert len(set(crowd.values())) == len(many)
    # "Lukas" is a word of the real name "LukasBerg", so one first name fewer is free; the rest get pairs.
    assert sum(" " in v for v in crowd.values()) == len(many) - (len(PSEUDONYM_FIRST_NAMES) - 1)
    assert not any("Lukas" in v.split() for v in crowd.values())


def test_masker_replaces_every_form_of_the_name():
    masker = NameMasker(
        {"RonaldReagan": "Otto", "AlbertEinstein": "Mira", "JWMarriott": "Kit", "EdwardGRobinson": "Ivy"}
    )
    caption = "Ronald Reagan, ronald_reagan and RONALDREAGAN; Reagan's hat; Ronald smiles near a reagent."
    assert masker(caption, "RonaldReagan") == "Otto, Otto and Otto; Otto's hat; Otto smiles near a reagent."
    assert masker("J.W. Marriott met Edward G. Robinson and Albert Einstein.", "RonaldReagan") == (
        "Kit met Ivy and Mira."
    )
    assert name_parts("JWMarriott") == ["JW", "Marriott"]


def test_no_real_name_in_captions_identities_or_files(agedb_dir, tmp_path):
    lines = []
    for path in sorted(agedb_dir.iterdir()):
        real = parse_agedb_filename(path.name)["identity"]
        spaced = " ".join(name_parts(real))
        lines.append(
            {
                "file_name": path.name,
                "text": f"{spaced} ({real}) next to {' '.join(name_parts('RonaldReagan'))}.",
            }
        )
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "masked"
    _build(agedb_dir, out, captions_file=str(captions))
    rows = _read_metadata(out)
    names = json.loads((out / "names.json").read_text())
    assert sorted(names.values()) == ["AlbertEinstein", "JWMarriott", "LuiseRainer", "RonaldReagan"]
    leaked = re.compile("|".join(p for real in AGEDB_COUNTS for p in name_parts(real) if len(p) > 2), re.I)
    for row in rows:
        assert not leaked.search(row["text"] + row["identity"] + row["file_name"]), row
        # The caption names the row's own identity by its pseudonym, and Reagan by his.
        reagan = next(p for p, r in names.items() if r == "RonaldReagan")
        assert row["text"] == f"{row['identity']} ({row['identity']}) next to {reagan}."

    # Template captions get the pseudonym and parsed fields.
    templ = tmp_path / "templ"
    _build(agedb_dir, templ, caption_template="An image of {name}, aged {age}.")
    sources = json.loads((templ / "sources.json").read_text())
    for row in _read_metadata(templ):
        age = parse_agedb_filename(sources[row["file_name"]])["age"]
        assert row["text"] == f"An image of {row['identity']}, aged {age}."

    with pytest.raises(ValueError, match="no caption for image"):
        captions.write_text(json.dumps(lines[0]))
        _build(agedb_dir, tmp_path / "missing", captions_file=str(captions))


# ------------------------------------------------------------------------------------- loading and validation


def test_load_filters_split_and_fingerprint_is_stable(built, tmp_path):
    out, summary = built
    train = load_image_text_dataset(train_data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert len(train) == summary["num_train_images"] == 14
    assert set(train["split"][:]) == {"train"}
    reference = load_image_text_dataset(
        train_data_dir=str(out), cache_dir=str(tmp_path / "cache"), split="reference"
    )
    assert len(reference) == summary["num_reference_images"] == 7
    assert resolve_columns(train.column_names, None, None) == ("image", "text", "identity")
    labels = identity_labels(train, "identity", "text")
    assert check_identities(labels) == summary["train_counts"]

    again = load_image_text_dataset(train_data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert dataset_fingerprint(again) == dataset_fingerprint(train) != dataset_fingerprint(reference)

    with pytest.raises(ValueError, match="exactly one"):
        load_image_text_dataset()
    with pytest.raises(ValueError, match="exactly one"):
        load_image_text_dataset(dataset_name="x", train_data_dir=str(out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images found in"):
        load_image_text_dataset(train_data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="holds \\['reference', 'train'\\]"):
        load_image_text_dataset(train_data_dir=str(out), cache_dir=str(tmp_path / "cache"), split="test")


def test_resolve_columns_defaults_and_errors():
    assert resolve_columns(["image", "text"], None, None) == ("image", "text", None)
    assert resolve_columns(["img", "caption", "who"], None, None, "who") == ("img", "caption", "who")
    assert resolve_columns(["text", "pixels", "identity"], "pixels", None, None) == ("pixels", "text", None)
    with pytest.raises(ValueError, match=r"--image_column value 'photo'.*\['image', 'text'\]"):
        resolve_columns(["image", "text"], "photo", None)
    with pytest.raises(ValueError, match=r"--caption_column value 'prompt'.*\['image', 'text'\]"):
        resolve_columns(["image", "text"], None, "prompt")
    with pytest.raises(ValueError, match=r"--identity_column value 'person'.*\['image', 'text'\]"):
        resolve_columns(["image", "text"], None, None, "person")


def test_check_identities_warns_about_single_images():
    with pytest.warns(UserWarning, match=r"1 identities have exactly one: 'solo'"):
        counts = check_identities(["a", "b", "a", "solo", "b", "b"])
    assert counts == {"a": 2, "b": 3, "solo": 1}


def test_load_rgb_accepts_dataset_values_and_names_corrupt_files(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGBA", (3, 2), (10, 20, 30, 255)).save(path)
    for value in (str(path), {"path": str(path), "bytes": None}, {"path": None, "bytes": path.read_bytes()}):
        image = load_rgb(value)
        assert image.mode == "RGB" and image.size == (3, 2) and image.getpixel((0, 0)) == (10, 20, 30)
    assert load_rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        load_rgb(str(broken))
    with pytest.raises(ValueError, match=r"data/broken.jpg \(row 3 of the training set\)"):
        load_rgb(
            {"path": "data/broken.jpg", "bytes": b"\x89PNG garbage"}, path_hint="row 3 of the training set"
        )
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "noise.png").read_bytes()[:4000])
    with pytest.raises(ValueError, match="truncated.png"):
        load_rgb(Image.open(truncated))


def test_row_image_loader_names_the_broken_file_and_returns_the_pixels(tmp_path):
    import datasets

    good, broken = tmp_path / "good.png", tmp_path / "broken.png"
    pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(good)
    broken.write_bytes(b"\x89PNG not really")
    dataset = datasets.Dataset.from_dict(
        {"image": [str(good), str(broken)], "text": ["a", "b"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    load = row_image_loader(dataset, "image", where="the reference set")
    image = load(0)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)
    with pytest.raises(UserError, match=re.escape(f"{broken} (row 1 of the reference set)")):
        load(1)
    # A column of plain path strings works the same; the default says "the training set".
    paths = datasets.Dataset.from_dict({"image": [str(good), str(broken)]})
    assert np.array_equal(np.asarray(row_image_loader(paths, "image")(0)), pixels)
    with pytest.raises(UserError, match=re.escape(f"{broken} (row 1 of the training set)")):
        row_image_loader(paths, "image")(1)


# ---------------------------------------------------------------------------------------------- transforms


def _columns_image(widths_colours, height):
    array = np.concatenate([np.tile(np.array(c, np.uint8), (height, 1, 1)) for c in widths_colours], axis=1)
    return Image.fromarray(array)


def _expected(colours_per_column, height):
    pixels = torch.tensor(colours_per_column, dtype=torch.float32) / 255.0  # (W, 3)
    return ((pixels - 0.5) / 0.5).T[:, None, :].expand(3, height, len(colours_per_column))


def test_preprocess_matches_hand_computed_center_crops():
    c = [(0, 0, 0), (255, 0, 51), (102, 255, 0), (204, 153, 255), (51, 51, 51)]
    # 4x2 landscape, resolution 2: no resize (shorter side already 2), crop left = round(1.0) = 1.
    out = preprocess_image(_columns_image(c[:4], 2), 2, center_crop=True)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    assert torch.equal(out, _expected([c[1], c[2]], 2))
    assert out[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, -0.6])  # 255 -> 1, 0 -> -1, 51 -> -0.6
    # 5x2: left = round(1.5) = 2 (half to even, as torchvision's CenterCrop).
    assert torch.equal(
        preprocess_image(_columns_image(c, 2), 2, center_crop=True), _expected([c[2], c[3]], 2)
    )
    # 2x4 portrait: top = round(1.0) = 1, so rows 1 and 2.
    rows = Image.fromarray(np.array([[c[i]] * 2 for i in range(4)], np.uint8))
    expected_rows = _expected([c[1], c[2]], 2).permute(0, 2, 1)
    assert torch.equal(preprocess_image(rows, 2, center_crop=True), expected_rows)
    # 6x3 constant colour -> resized to 4x2 (bilinear keeps a constant), cropped to 2x2.
    flat = preprocess_image(Image.new("RGB", (6, 3), (255, 0, 51)), 2, center_crop=True)
    assert torch.allclose(flat, torch.tensor([1.0, -1.0, -0.6]).view(3, 1, 1).expand(3, 2, 2))


def test_preprocess_interpolation_modes():
    c = [(0, 0, 0), (255, 0, 51), (102, 255, 0), (204, 153, 255)]
    image = _columns_image(c, 2)
    # 4x2 -> 2x1 with nearest: output column x samples input column floor((x + 0.5) * 2), i.e. 1 and 3;
    # the 1x1 center crop keeps left = round(0.5) = 0, i.e. input column 1.
    assert torch.equal(
        preprocess_image(image, 1, center_crop=True, interpolation="nearest"), _expected([c[1]], 1)
    )
    smooth = {
        m: preprocess_image(image, 1, center_crop=True, interpolation=m) for m in ("bilinear", "lanczos")
    }
    assert not torch.equal(smooth["bilinear"], smooth["lanczos"])
    with pytest.raises(ValueError, match="interpolation must be one of"):
        preprocess_image(image, 1, center_crop=True, interpolation="cubic")


def test_preprocess_random_ops_come_from_the_generator_only():
    c = [(0, 0, 0), (255, 0, 51), (102, 255, 0), (204, 153, 255), (51, 51, 51), (9, 9, 9)]
    image = _columns_image(c, 2)
    with pytest.raises(ValueError, match="torch.Generator"):
        preprocess_image(image, 2)
    with pytest.raises(ValueError, match="torch.Generator"):
        preprocess_image(image, 2, center_crop=True, random_flip=True)

    seen = set()
    for seed in range(12):
        torch.manual_seed(123)  # the global RNG must not matter
        out = preprocess_image(image, 2, random_flip=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(
            out, preprocess_image(image, 2, random_flip=True, generator=torch.Generator().manual_seed(seed))
        )
        # Same draws by hand: row offset (only 0 possible), column offset in [0, 4], then the flip.
        g = torch.Generator().manual_seed(seed)
        top = torch.randint(0, 1, (1,), generator=g).item()
        left = torch.randint(0, 5, (1,), generator=g).item()
        flip = torch.rand(1, generator=g).item() < 0.5
        cols = [c[left], c[left + 1]][:: -1 if flip else 1]
        assert top == 0 and torch.equal(out, _expected(cols, 2))
        seen.add((left, flip))
    assert len(seen) > 3


# ------------------------------------------------------------------------------------------ command line


def test_cli_builds_from_subfolders(tmp_path, capsys):
    root = tmp_path / "faces"
    for k, (name, n) in enumerate({"anna": 5, "ben": 3, "cleo": 2}.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            _square((80 * k, 10 * i, 0), size=12).save(root / name / f"{i}.jpg")
    out = tmp_path / "out"
    main(
        [
            "build",
            "--image_dir",
            str(root),
            "--identity_from",
            "folder",
            "--majority_ids",
            "1",
            "--majority_images",
            "4",
            "--minority_ids",
            "2",
            "--output_dir",
            str(out),
            "--no-mask_names",
            "--resolution",
            "6",
        ]
    )
    printed = capsys.readouterr().out
    assert "identities: 3   training images: 8   reference images: 2" in printed
    rows = _read_metadata(out)
    assert [(r["identity"], r["split"]) for r in rows].count(("anna", "train")) == 4
    assert {r["text"] for r in rows if r["identity"] == "ben"} == {"An image of ben."}
    assert all(Image.open(out / r["file_name"]).size == (6, 6) for r in rows)
    assert not (out / "names.json").exists()
    with pytest.raises(ValueError, match="not empty"):
        main(["build", "--image_dir", str(root), "--preset", "S", "--output_dir", str(out)])


def test_builder_reads_an_imagefolder_with_identity_column(tiny_dataset_path, tmp_path):
    out = tmp_path / "from-dataset"
    summary = build_longtail_dataset(
        str(out),
        input_data_dir=tiny_dataset_path,
        cache_dir=str(tmp_path / "cache"),
        caption_column="text",
        majority_ids=2,
        majority_images=4,
        minority_ids=2,
        minority_images=2,
        show_progress=False,
    )
    names = json.loads((out / "names.json").read_text())
    assert sorted(names.values()) == ["alice", "bruno", "chen", "dara"]
    assert {names[k]: v for k, v in summary["train_counts"].items()} == {
        "alice": 4,
        "bruno": 4,
        "chen": 2,
        "dara": 2,
    }
    assert summary["num_reference_images"] == 4
    rows = _read_metadata(out)
    source_rows = {
        json.loads(x)["file_name"]: json.loads(x)
        for x in (Path(tiny_dataset_path) / "metadata.jsonl").read_text().splitlines()
    }
    sources = json.loads((out / "sources.json").read_text())
    for row in rows:
        original = source_rows[Path(sources[row["file_name"]]).name]
        # The dataset's own caption, with the real name swapped for the pseudonym; bytes copied unchanged.
        assert row["text"] == original["text"].replace(original["identity"], row["identity"])
        assert names[row["identity"]] == original["identity"]
        assert (out / row["file_name"]).read_bytes() == Path(sources[row["file_name"]]).read_bytes()


# ---- image modes: intensities scaled (never clipped), transparency over white, EXIF orientation applied --------


def _rgb_values(image) -> list:
    return np.asarray(load_rgb(image)).tolist()


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 65535], [25700, 32768]], dtype=np.uint16)  # 25700 = 100 * 257
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    # v * 255 / 65535: 0, 255, 100, 127.50 -> 128; identical for R, G, B.
    expected = [[[0] * 3, [255] * 3], [[100] * 3, [128] * 3]]
    assert _rgb_values(image) == expected
    # Through a 16-bit PNG file (PIL may open it as I;16 or as 32-bit I).
    path = tmp_path / "sixteen.png"
    image.save(path)
    assert _rgb_values(str(path)) == expected


def test_thirty_two_bit_int_and_float_modes():
    eight_bit_range = Image.fromarray(np.array([[0, 200]], dtype=np.int32), mode="I")
    assert _rgb_values(eight_bit_range) == [[[0] * 3, [200] * 3]]
    sixteen_bit_range = Image.fromarray(np.array([[0, 65535, 257]], dtype=np.int32), mode="I")
    assert _rgb_values(sixteen_bit_range) == [[[0] * 3, [255] * 3, [1] * 3]]
    # Outside 0-65535: min-max scaled: (v + 5) * 255 / 70005 -> 0, 255, 3.66 -> 4.
    wide = Image.fromarray(np.array([[-5, 70000, 1000]], dtype=np.int32), mode="I")
    assert _rgb_values(wide) == [[[0] * 3, [255] * 3, [4] * 3]]
    unit_float = Image.fromarray(np.array([[0.0, 1.0, 0.5, 0.25]], dtype=np.float32), mode="F")
    assert _rgb_values(unit_float) == [[[0] * 3, [255] * 3, [128] * 3, [64] * 3]]
    other_float = Image.fromarray(np.array([[-1.0, 3.0, 1.0]], dtype=np.float32), mode="F")
    assert _rgb_values(other_float) == [[[0] * 3, [255] * 3, [128] * 3]]  # (v + 1) * 255 / 4: 127.5 -> 128


def test_transparency_is_composited_over_white():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 0  # palette entry 0 (red) is fully transparent
    assert _rgb_values(palette) == [[[255, 255, 255], [0, 0, 255]]]

    la = Image.fromarray(np.array([[[0, 0], [100, 255], [0, 128]]], dtype=np.uint8), mode="LA")
    transparent, opaque, half = _rgb_values(la)[0]
    assert transparent == [255] * 3 and opaque == [100] * 3
    assert all(abs(v - 127) <= 1 for v in half)  # 255 * (1 - 128/255) = 127

    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8), mode="RGBA")
    assert _rgb_values(rgba) == [[[255, 255, 255], [10, 20, 30]]]


def test_cmyk_and_exif_orientation(tmp_path):
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])
    assert _rgb_values(cmyk) == [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]

    # A 2x1 image (red, blue) tagged "rotate 90 degrees clockwise to display" (EXIF orientation 6).
    image = Image.new("RGB", (2, 1))
    image.putdata([(255, 0, 0), (0, 0, 255)])
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    shown = load_rgb(str(path))
    assert shown.size == (1, 2)
    assert np.asarray(shown).tolist() == [[[255, 0, 0]], [[0, 0, 255]]]
