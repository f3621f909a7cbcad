"""pogdiff/index.py: building, caching and summarising the per-sample table the PoGDiff trainer reads."""

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pogdiff.index as index_module
from pogdiff.features import vae_image_encoder
from pogdiff.index import (
    PoGDiffIndex,
    build_or_load_index,
    format_summary,
    main,
    one_caption_per_identity_warning,
    plot_index,
    summarize_index,
)
from pogdiff.psi import PsiParams

TINY_COUNTS = {"alice": 6, "bruno": 6, "chen": 2, "dara": 2}
FAST_DENSITY = {
    "density_epochs": 5,
    "density_hidden_dim": 32,
    "density_latent_dim": 4,
    "density_num_samples": 16,
}


@pytest.fixture(scope="module")
def rows(tiny_dataset_path):
    """(images, texts, identities) of the tiny dataset, in metadata.jsonl order."""
    folder = Path(tiny_dataset_path)
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(folder / r["file_name"]).convert("RGB") for r in records]
    return images, [r["text"] for r in records], [r["identity"] for r in records]


class MeanColour:
    """A counting fake encoder: the mean RGB colour of each image (the tiny identities differ in colour)."""

    name = "mean-colour"

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, images):
        self.calls += 1
        self.images += len(images)
        return torch.tensor(np.stack([np.asarray(im, dtype=np.float64).mean(axis=(0, 1)) for im in images]))


class Counting:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _build(rows, tiny_sd_path, cache_dir, encoder, **overrides):
    images, texts, identities = rows
    get_image = Counting(lambda i: images[i])
    kwargs = {
        "pretrained_model_name_or_path": tiny_sd_path,
        "num_neighbors": 5,
        "cache_dir": str(cache_dir),
        "fingerprint": "tiny-v1",
        "batch_size": 5,
        "image_encoder_fn": encoder,
        **FAST_DENSITY,
        **overrides,
    }
    return build_or_load_index(get_image, texts, identities, **kwargs), get_image


def _index_folders(cache_dir):
    """The cache's index folders (not the hidden lock files beside them)."""
    return sorted(p.name for p in Path(cache_dir).iterdir() if not p.name.startswith("."))


def _hand_cosines(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit @ unit.T


def _assert_tensors_equal(a: PoGDiffIndex, b: PoGDiffIndex):
    for name in ("neighbor_ids", "neighbor_sims", "identity_ids", "text_ids", "txt_log_weights", "elbo"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture(scope="module")
def built(rows, tiny_sd_path, tmp_path_factory):
    """One index built with the mean-colour fake, plus the counters of that build."""
    cache_dir = tmp_path_factory.mktemp("index-cache")
    encoder = MeanColour()
    index, get_image = _build(rows, tiny_sd_path, cache_dir, encoder)
    return index, encoder, get_image, cache_dir


def test_build_then_cache_hit_calls_no_encoder(built, rows, tiny_sd_path, monkeypatch, caplog):
    index, encoder, get_image, cache_dir = built
    assert (encoder.calls, encoder.images, get_image.calls) == (4, 16, 16)  # batches of 5: 5+5+5+1
    # The atomic write leaves exactly the final folder, no temporary one.
    assert _index_folders(cache_dir) == [f"pogdiff-index-{index.config['key'][:16]}"]

    text_encoder = Counting(index_module.encode_texts)
    monkeypatch.setattr(index_module, "encode_texts", text_encoder)
    again_encoder = MeanColour()
    with caplog.at_level(logging.INFO, logger="pogdiff.index"):
        again, again_get_image = _build(rows, tiny_sd_path, cache_dir, again_encoder)
    assert (again_encoder.calls, again_get_image.calls, text_encoder.calls) == (0, 0, 0)
    assert "cache hit" in caplog.text
    _assert_tensors_equal(index, again)
    assert again.identity_names == index.identity_names and again.config == index.config
    assert _index_folders(cache_dir) == [f"pogdiff-index-{index.config['key'][:16]}"]


@pytest.mark.parametrize(
    "change", [{"num_neighbors": 3}, {"density_temperature": 2.0}, {"fingerprint": "tiny-v2"}, {"seed": 1}]
)
def test_changed_parameter_rebuilds_into_new_folder(built, rows, tiny_sd_path, tmp_path, change):
    index, _, _, cache_dir = built
    # Copy the cached folder into a fresh cache, so each case sees exactly one existing index.
    original = f"pogdiff-index-{index.config['key'][:16]}"
    shutil.copytree(Path(cache_dir) / original, tmp_path / original)
    encoder = MeanColour()
    rebuilt, get_image = _build(rows, tiny_sd_path, tmp_path, encoder, **change)
    assert (encoder.images, get_image.calls) == (16, 16)
    assert rebuilt.config["key"] != index.config["key"]
    assert _index_folders(tmp_path) == sorted([original, f"pogdiff-index-{rebuilt.config['key'][:16]}"])
    for name, value in change.items():
        assert rebuilt.config[name] == value
    assert rebuilt.neighbor_ids.shape == (16, change.get("num_neighbors", 5))


def test_neighbours_sims_identities_and_text_groups(built, rows):
    index, _, _, _ = built
    images, texts, identities = rows
    assert len(index) == 16
    # Self is never a neighbour, and the similarities are the cosines of the fake's vectors, in order.
    assert not (index.neighbor_ids == torch.arange(16)[:, None]).any()
    cosines = _hand_cosines(MeanColour()(images).numpy())
    np.testing.assert_allclose(
        index.neighbor_sims.numpy(), np.take_along_axis(cosines, index.neighbor_ids.numpy(), 1), atol=1e-6
    )
    assert (index.neighbor_sims[:, :-1] >= index.neighbor_sims[:, 1:]).all()
    # Top-k: no excluded row is more similar than the k-th neighbour.
    np.fill_diagonal(cosines, -np.inf)
    np.testing.assert_allclose(index.neighbor_sims.numpy(), -np.sort(-cosines, axis=1)[:, :5], atol=1e-6)
    # Identities: sorted names; rows in metadata order (6 alice, 6 bruno, 2 chen, 2 dara).
    assert index.identity_names == ["alice", "bruno", "chen", "dara"]
    assert index.identity_ids.tolist() == [0] * 6 + [1] * 6 + [2] * 2 + [3] * 2
    # The colours separate identities, so a majority row's 5 neighbours are its 5 siblings and a minority
    # row's first neighbour is its only sibling.
    same = index.identity_ids[index.neighbor_ids] == index.identity_ids[:, None]
    assert same[:12].all() and same[12:, 0].all() and not same[12:, 1:].any()
    # One caption per identity in the tiny dataset: text ids group exactly the identical captions.
    assert index.text_ids.tolist() == [0] * 6 + [1] * 6 + [2] * 2 + [3] * 2
    for i in range(16):
        for j in range(16):
            assert (index.text_ids[i] == index.text_ids[j]) == (texts[i] == texts[j])
    # Inverse-density weights have mean 1; ELBO and weights are finite.
    assert abs(index.txt_log_weights.exp().mean().item() - 1.0) < 1e-5
    assert torch.isfinite(index.elbo).all() and torch.isfinite(index.txt_log_weights).all()
    assert index.config["num_samples"] == 16 and index.config["num_distinct_texts"] == 4
    assert (
        index.config["image_embedding_dim"] == 3
        and index.config["neighbor_encoder"] == "callable:mean-colour"
    )


def test_centre_on_real_encoder_is_centred_before_knn(rows, tiny_sd_path, tmp_path):
    # An encoder flagged centre_on_real (dlib faces) has the dataset mean removed before the cosine.
    class Centred(MeanColour):
        name = "mean-colour-centred"
        centre_on_real = True

    images, _, _ = rows
    index, _ = _build(rows, tiny_sd_path, tmp_path, Centred())
    vectors = MeanColour()(images).numpy()
    cosines = _hand_cosines(vectors - vectors.mean(axis=0))
    assert index.config["image_embeddings_centred"] is True
    np.testing.assert_allclose(
        index.neighbor_sims.numpy(), np.take_along_axis(cosines, index.neighbor_ids.numpy(), 1), atol=1e-6
    )
    # A minority row's neighbours of other identities: raw cosine > 0.5, centred < 0.3.
    raw = np.take_along_axis(_hand_cosines(vectors), index.neighbor_ids.numpy(), 1)
    assert raw[12:, 1:].min() > 0.5 and index.neighbor_sims[12:, 1:].max() < 0.3


def test_summary_of_built_index_matches_dataset(built):
    index, _, _, _ = built
    summary = summarize_index(index)
    assert summary["num_samples"] == 16 and summary["num_neighbors"] == 5 and summary["num_identities"] == 4
    assert summary["identity_counts"] == TINY_COUNTS
    assert list(summary["identity_counts"]) == ["alice", "bruno", "chen", "dara"]  # largest first
    assert summary["majority_identities"] == ["alice", "bruno"]
    assert summary["minority_identities"] == ["chen", "dara"]
    sizes = {group: row["num_samples"] for group, row in summary["groups"].items()}
    assert sizes == {"all": 16, "majority": 12, "minority": 4}
    # Neighbours of another identity: none for the 12 majority rows, 4 of 5 for the 4 minority rows.
    assert summary["other_identity_neighbor_fraction"] == pytest.approx(16 / 80)
    assert summary["groups"]["majority"]["other_identity_neighbor_fraction"] == 0.0
    assert summary["groups"]["minority"]["other_identity_neighbor_fraction"] == pytest.approx(0.8)
    json.dumps(summary)  # serialisable as is


def test_too_many_neighbours_fails_before_encoding(rows, tiny_sd_path, tmp_path):
    encoder = MeanColour()
    with pytest.raises(ValueError, match=r"--num_neighbors.*N=16"):
        _build(rows, tiny_sd_path, tmp_path, encoder, num_neighbors=16)
    assert encoder.calls == 0 and not any(tmp_path.iterdir())


def _hand_index() -> PoGDiffIndex:
    """4 samples, k = 2: identities a, a, b, c; text weights 0.5, 0.5, 1, 2 (mean 1)."""
    return PoGDiffIndex(
        neighbor_ids=torch.tensor([[1, 2], [0, 3], [0, 3], [2, 1]]),
        neighbor_sims=torch.tensor([[0.8, 0.2], [0.8, -0.1], [0.5, 0.5], [0.6, 0.0]]),
        identity_ids=torch.tensor([0, 0, 1, 2]),
        identity_names=["a", "b", "c"],
        text_ids=torch.tensor([0, 0, 1, 2]),
        txt_log_weights=torch.tensor([0.5, 0.5, 1.0, 2.0]).log(),
        elbo=torch.tensor([3.0, 3.0, 1.0, 0.5]),
        config={"key": "hand", "neighbor_encoder": "none"},
    )


def test_summary_expected_psi_by_hand():
    # a1 = a2 = a3 = 1; w = clamp(s, 0) / sum; psi_j = s_j ** (1 + [other identity]) * weight.
    #   row 0 (a): w = (0.8, 0.2), psi = (0.8, 0.2**2) * 0.5  -> (0.64 + 0.008) * 0.5 = 0.324
    #   row 1 (a): w = (1, 0),     psi = 0.8 * 0.5             -> 0.4
    #   row 2 (b): w = (0.5, 0.5), psi = (0.25, 0.25) * 1      -> 0.25
    #   row 3 (c): w = (1, 0),     psi = 0.6**2 * 2            -> 0.72
    summary = summarize_index(_hand_index(), few_shot_max=1)
    assert summary["identity_counts"] == {"a": 2, "b": 1, "c": 1}
    assert summary["majority_identities"] == ["a"] and summary["minority_identities"] == ["b", "c"]
    groups = summary["groups"]
    assert groups["majority"]["expected_psi"] == pytest.approx({"mean": 0.362, "min": 0.324, "max": 0.4})
    assert groups["minority"]["expected_psi"] == pytest.approx({"mean": 0.485, "min": 0.25, "max": 0.72})
    assert groups["all"]["expected_psi"]["mean"] == pytest.approx(1.694 / 4)
    assert summary["psi"] == {group: row["expected_psi"] for group, row in groups.items()}
    assert summary["psi_params"] == {"a1": 1.0, "a2": 1.0, "a3": 1.0, "terms": "img,txt"}
    assert groups["majority"]["mean_txt_weight"] == pytest.approx(0.5)
    assert groups["minority"]["mean_txt_weight"] == pytest.approx(1.5)
    assert groups["all"]["mean_neighbor_sim"] == pytest.approx(3.3 / 8)
    assert summary["other_identity_neighbor_fraction"] == pytest.approx(6 / 8)
    assert groups["majority"]["other_identity_neighbor_fraction"] == pytest.approx(0.5)
    assert groups["minority"]["other_identity_neighbor_fraction"] == pytest.approx(1.0)

    # Image term only, a2 = 0, a3 = 2: row 0 -> (0.8*0.8 + 0.2*0.2) / 2 = 0.34; row 3 -> 0.6 / 2 = 0.3.
    img_only = summarize_index(_hand_index(), PsiParams(a2=0.0, a3=2.0, terms="img"), few_shot_max=1)
    assert img_only["groups"]["majority"]["expected_psi"]["min"] == pytest.approx(0.34)
    assert img_only["groups"]["minority"]["expected_psi"]["max"] == pytest.approx(0.3)
    # Default split (few-shot <= 2 images): every identity is a minority one; majority stats are empty.
    default = summarize_index(_hand_index())
    assert default["majority_identities"] == [] and default["groups"]["majority"]["expected_psi"] is None
    none = summarize_index(_hand_index(), PsiParams(terms="none"))
    assert none["groups"]["all"]["expected_psi"] == {"mean": 0.0, "min": 0.0, "max": 0.0}

    table = format_summary(summary)
    assert any(line.split() == ["a", "2", "majority"] for line in table.splitlines())
    assert any(line.split()[:5] == ["minority", "2", "0.485", "0.25", "0.72"] for line in table.splitlines())


def test_save_load_round_trip(tmp_path):
    index = _hand_index()
    index.save(tmp_path / "idx")
    loaded = PoGDiffIndex.load(tmp_path / "idx")
    _assert_tensors_equal(index, loaded)
    assert loaded.identity_names == ["a", "b", "c"] and loaded.config == index.config and len(loaded) == 4
    assert loaded.neighbor_ids.dtype == torch.int64 and loaded.neighbor_sims.dtype == torch.float32


def test_plot_index_writes_pngs(tmp_path):
    index = _hand_index()
    paths = plot_index(index, summarize_index(index, few_shot_max=1), tmp_path)
    assert [Path(p).name for p in paths] == ["identity_counts.png", "expected_psi.png"]
    # figsize (inches) x dpi 120, exact because the layout is not cropped.
    assert Image.open(paths[0]).size == (960, 420) and Image.open(paths[1]).size == (720, 420)


def test_vae_encoder_neighbours_on_tiny_model(rows, tiny_sd_path, tmp_path):
    images, _, _ = rows
    index, _ = _build(rows, tiny_sd_path, tmp_path, None, neighbor_encoder="vae", resolution=32)
    # The tiny VAE downsamples 2x: 4 x 16 x 16 latent means per image.
    assert index.config["image_embedding_dim"] == 4 * 16 * 16 and index.config["neighbor_encoder"] == "vae"
    latents = vae_image_encoder(tiny_sd_path, resolution=32)(images).double().numpy()
    cosines = _hand_cosines(latents)
    assert not (index.neighbor_ids == torch.arange(16)[:, None]).any()
    np.testing.assert_allclose(
        index.neighbor_sims.numpy(), np.take_along_axis(cosines, index.neighbor_ids.numpy(), 1), atol=1e-5
    )


def test_cli_end_to_end(tiny_sd_path, tiny_dataset_path, tmp_path, capsys, caplog):
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd_path,
        "--train_data_dir",
        tiny_dataset_path,
        "--neighbor_encoder",
        "pixels",
        "--num_neighbors",
        "3",
        "--density_epochs",
        "5",
        "--density_hidden_dim",
        "32",
        "--density_w_max",
        "none",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path),
    ]
    summary = main(argv)
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    for name, count in TINY_COUNTS.items():
        assert [name, str(count), "minority" if count <= 2 else "majority"] in lines
    assert "16 samples, k=3 neighbours (pixels)" in out
    assert summary["identity_counts"] == TINY_COUNTS and summary["minority_identities"] == ["chen", "dara"]
    assert json.loads((tmp_path / "index_summary.json").read_text()) == summary
    assert Image.open(tmp_path / "identity_counts.png").format == "PNG"
    assert Image.open(tmp_path / "expected_psi.png").format == "PNG"
    folders = [p for p in tmp_path.iterdir() if p.name.startswith("pogdiff-index-")]
    assert len(folders) == 1
    loaded = PoGDiffIndex.load(folders[0])
    assert loaded.config["density_w_max"] is None and loaded.config["num_neighbors"] == 3
    assert math.isclose(loaded.txt_log_weights.exp().mean().item(), 1.0, abs_tol=1e-5)

    # Second run: the index is loaded from output_dir, nothing is rebuilt.
    with caplog.at_level(logging.INFO, logger="pogdiff.index"):
        assert main(argv) == summary
    assert "cache hit" in caplog.text


def test_one_caption_per_identity_is_said():
    template = ["An image of a.", "An image of a.", "An image of b."]
    warning = one_caption_per_identity_warning(template, ["a", "a", "b"])
    assert warning.startswith("Every identity here has a single caption (2 identities, 2 distinct captions)")
    assert "only pulls toward other identities" in warning and "Per-image captions" in warning
    per_image = ["a, thick.", "a, thin.", "b, thin."]
    assert one_caption_per_identity_warning(per_image, ["a", "a", "b"]) is None


def test_a_corrupt_cached_index_is_rebuilt_with_a_warning(rows, tiny_sd_path, tmp_path, caplog):
    first, _ = _build(rows, tiny_sd_path, tmp_path, MeanColour())
    tensors = tmp_path / f"pogdiff-index-{first.config['key'][:16]}" / "index.safetensors"
    assert tensors.is_file()
    tensors.write_bytes(tensors.read_bytes()[:100])  # a copy cut short
    encoder = MeanColour()
    with caplog.at_level(logging.WARNING, logger="pogdiff.index"):
        again, _ = _build(rows, tiny_sd_path, tmp_path, encoder)
    assert "unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert encoder.calls > 0
    _assert_tensors_equal(first, again)


def test_a_second_builder_waits_for_the_first(rows, tiny_sd_path, tmp_path, caplog):
    """Two runs on one cache: while one holds the index's lock the other waits, then loads its result."""
    import threading

    from filelock import FileLock

    built, _ = _build(rows, tiny_sd_path, tmp_path / "ref", MeanColour())
    name = f"pogdiff-index-{built.config['key'][:16]}"
    holder = FileLock(str(tmp_path / "shared" / f".{name}.lock"))
    (tmp_path / "shared").mkdir()
    holder.acquire()
    result = {}
    with caplog.at_level(logging.WARNING, logger="pogdiff.index"):
        waiter = threading.Thread(
            target=lambda: result.update(
                index=_build(rows, tiny_sd_path, tmp_path / "shared", MeanColour())[0]
            )
        )
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive() and "another run is building" in caplog.text
        holder.release()
        waiter.join(timeout=120)
    assert not waiter.is_alive()
    _assert_tensors_equal(built, result["index"])
