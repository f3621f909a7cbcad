"""Metrics (pogdiff/metrics.py) on hand-made features, and the feature extractors (pogdiff/features.py)."""

import math
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from pogdiff.features import (
    FaceFeatureExtractor,
    HFFeatureExtractor,
    PixelFeatureExtractor,
    centre_on,
    get_feature_extractor,
)
from pogdiff.identities import shot_split
from pogdiff.metrics import (
    aggregate_metrics,
    dino_score,
    frechet_distance,
    grecall,
    identity_metrics,
)


def unit(angle_degrees: float) -> list[float]:
    """A 2-D unit vector at the given angle."""
    rad = math.radians(angle_degrees)
    return [math.cos(rad), math.sin(rad)]


# ----------------------------------------------------------------------------------------------- gRecall


def test_grecall_reproduces_paper_appendix_f():
    # AgeDB-IT2I-small: a majority identity with 30 training images, a minority one with 2. PoGDiff covers
    # 18/30 and 2/2, so the paper reports 0.5 * 18/30 + 0.5 * 2/2 = 0.8.
    basis = np.eye(40)
    train = {"majority": basis[:30], "minority": basis[30:32]}
    # Generated images: exact copies of 18 majority images (some twice) plus 3 unrelated images
    # (orthogonal to every training image); exact copies of both minority images.
    generated = {
        "majority": np.concatenate([basis[:18], basis[:5], basis[35:38]]),
        "minority": np.concatenate([basis[30:32], basis[30:31]]),
    }
    per_identity = {}
    for name in train:
        for rule in ("nearest", "any"):
            assert (
                grecall(generated[name], train[name], threshold=0.7, rule=rule)
                == {
                    "majority": (18, 30),
                    "minority": (2, 2),
                }[name]
            )
        per_identity[name] = identity_metrics(generated[name], train[name], train[name])
    summary = aggregate_metrics(per_identity, shot_split({"majority": 30, "minority": 2}))
    assert summary["grecall"]["all"] == pytest.approx(0.8, abs=1e-12)
    assert summary["grecall"]["few"] == 1.0
    assert summary["grecall"]["many"] == pytest.approx(18 / 30, abs=1e-12)
    assert (summary["grecall"]["n_all"], summary["grecall"]["n_few"]) == (2, 1)


def test_grecall_nearest_and_any_differ_when_one_image_is_near_two():
    # Training images at 0, 80 and 180 degrees. One generated image at 38 degrees has cosine 0.788 with
    # the first and 0.743 with the second (both >= 0.7), but its nearest is the first.
    train = np.array([unit(0), unit(80), unit(180)])
    generated = np.array([unit(38)])
    assert grecall(generated, train, 0.7, "nearest") == (1, 3)
    assert grecall(generated, train, 0.7, "any") == (2, 3)
    # A second generated image at 75 degrees (nearest: the 80-degree image) covers it under both rules.
    generated = np.array([unit(38), unit(75)])
    assert grecall(generated, train, 0.7, "nearest") == (2, 3)
    assert grecall(generated, train, 0.7, "any") == (2, 3)
    # A generated image whose nearest training image is below the threshold covers nothing.
    assert grecall(np.array([unit(130)]), train, 0.7, "nearest") == (0, 3)


def test_grecall_threshold_is_inclusive_and_rule_is_checked():
    train = np.array([[1.0, 0.0]])
    at_threshold = np.array([[0.7, math.sqrt(1 - 0.49)]])
    assert grecall(at_threshold, train, threshold=0.7 - 1e-12) == (1, 1)
    assert grecall(at_threshold, train, threshold=0.71) == (0, 1)
    with pytest.raises(ValueError, match="nearest"):
        grecall(at_threshold, train, rule="closest")


# ----------------------------------------------------------------------------------------------- FID


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy.linalg.sqrtm, as an independent reference."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 8))
    b = rng.normal(loc=0.3, scale=1.5, size=(45, 8)) @ rng.normal(size=(8, 8))
    expected = scipy_frechet(a, b)
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    # torch float32 input is promoted to float64 and gives the same value.
    assert frechet_distance(torch.tensor(a, dtype=torch.float64), torch.tensor(b)) == pytest.approx(
        expected, rel=1e-6
    )


def test_frechet_distance_hand_computed_1d():
    # 1-D: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2. a = {0, 2}: mean 1, var 2; b = {3, 5, 7}: mean 5, var 4.
    a, b = np.array([[0.0], [2.0]]), np.array([[3.0], [5.0], [7.0]])
    assert frechet_distance(a, b) == pytest.approx(16 + (math.sqrt(2) - 2) ** 2, rel=1e-12)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm of a singular product
def test_frechet_distance_zero_for_identical_sets_and_finite_when_rank_deficient():
    rng = np.random.default_rng(1)
    # 10 images in 32 dims: rank-deficient covariance, and fewer images than dimensions, so this also
    # checks the exact reduction to the span of the images against scipy's full 32 x 32 computation.
    feats = rng.normal(size=(10, 32))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    real_two = rng.normal(size=(2, 32))  # 2 real images: covariance of rank 1
    value = frechet_distance(feats, real_two)
    assert math.isfinite(value) and value > 0
    assert value == pytest.approx(scipy_frechet(feats, real_two), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(feats, real_two[:1])


# ----------------------------------------------------------------------------------------------- DINO score


def test_dino_score_is_mean_pairwise_cosine():
    generated = np.array([unit(0), unit(90)])
    real = np.array([unit(0), [2.0, 2.0]])  # the second is unnormalised on purpose (cosine 0.7071 / 0.7071)
    # Pairs: (0,0)=1, (0,45)=cos45, (90,0)=0, (90,45)=cos45.
    expected = (1 + 2 * math.cos(math.radians(45)) + 0) / 4
    assert dino_score(generated, real) == pytest.approx(expected, abs=1e-12)
    assert dino_score(torch.tensor(generated), torch.tensor(real)) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------- splits, aggregation


def test_shot_split_picks_identities_with_at_most_few_shot_max_images():
    counts = {"ann": 30, "bob": 2, "cat": 1, "dan": 3, "eve": 2}
    split = shot_split(counts, few_shot_max=2)
    assert split == {
        "all": ["ann", "bob", "cat", "dan", "eve"],
        "few": ["bob", "cat", "eve"],
        "many": ["ann", "dan"],
    }
    assert shot_split(counts, few_shot_max=3)["few"] == ["bob", "cat", "dan", "eve"]


def test_identity_with_one_image_reports_fid_missing_with_reason_not_nan():
    generated = np.array([unit(0), unit(10), unit(20)])
    per_identity = {
        "solo": identity_metrics(generated, np.array([unit(0)]), np.array([unit(0)])),
        "pair": identity_metrics(generated, np.array([unit(0), unit(20)]), np.array([unit(0), unit(20)])),
    }
    assert per_identity["solo"]["fid"] is None
    assert "2 images" in per_identity["solo"]["missing"]["fid"]
    summary = aggregate_metrics(per_identity, shot_split({"solo": 1, "pair": 2}))
    assert summary["fid"]["all"] == pytest.approx(per_identity["pair"]["fid"], rel=1e-12)
    assert summary["fid"]["n_all"] == 1
    assert set(summary["fid"]["missing"]) == {"solo"}
    # DINO: solo has cosines 1, cos10, cos20 with its one real image; pair has 6 pairs.
    solo = (1 + math.cos(math.radians(10)) + math.cos(math.radians(20))) / 3
    pair = np.mean([math.cos(math.radians(g - r)) for g in (0, 10, 20) for r in (0, 20)])
    assert summary["dino"]["all"] == pytest.approx((solo + pair) / 2, abs=1e-12)
    assert summary["dino"]["missing"] == {}
    # No real images at all (no reference images for that identity): DINO and FID missing, gRecall computed.
    no_real = identity_metrics(generated, np.array([unit(0)]), None)
    assert (no_real["dino"], no_real["fid"], no_real["grecall"]) == (None, None, 1.0)
    assert no_real["missing"]["dino"] == "no real images"


# ----------------------------------------------------------------------------------------------- features


def split_image(size: int, flip: bool = False) -> Image.Image:
    """Left half black, right half white (or mirrored)."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, size // 2 :] = 255
    return Image.fromarray(pixels[:, ::-1] if flip else pixels)


def test_pixel_extractor_is_mean_centred_thumbnail_correlation():
    extractor = get_feature_extractor("pixels")
    assert isinstance(extractor, PixelFeatureExtractor) and not extractor.centre_on_real
    feats = extractor([split_image(32), split_image(64), split_image(32, flip=True)])
    assert feats.dtype == torch.float32 and feats.shape == (3, 16 * 16 * 3)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))
    sims = feats @ feats.T
    assert sims[0, 1].item() == pytest.approx(1.0, abs=1e-6)  # same layout at another resolution
    assert sims[0, 2].item() == pytest.approx(-1.0, abs=1e-6)  # mirror image: perfectly anti-correlated
    # A constant image has no variation left after centring: a zero row, not NaN.
    assert extractor([Image.new("RGB", (8, 8), (9, 9, 9))]).abs().sum().item() == 0.0


def test_callable_extractor_is_wrapped_normalised_and_checked(monkeypatch):
    module = types.ModuleType("fake_feature_module")

    def two_numbers(images):
        return [[float(index + 1), 0.0] for index, _ in enumerate(images)]

    def wrong_shape(images):
        return torch.zeros(len(images) + 1, 3)

    two_numbers.centre_on_real = True
    module.two_numbers, module.wrong_shape = two_numbers, wrong_shape
    monkeypatch.setitem(sys.modules, "fake_feature_module", module)

    extractor = get_feature_extractor("fake_feature_module:two_numbers", batch_size=2)
    assert extractor.centre_on_real and extractor.name == "fake_feature_module:two_numbers"
    torch.testing.assert_close(extractor([split_image(4)] * 3), torch.tensor([[1.0, 0.0]] * 3))
    with pytest.raises(ValueError, match="one row per image"):
        get_feature_extractor("fake_feature_module:wrong_shape")([split_image(4)])
    with pytest.raises(ValueError, match="module:function"):
        get_feature_extractor("fake_feature_module:missing")


def test_centre_on_subtracts_mean_and_renormalises():
    feats = torch.tensor([[1.0, 1.0], [1.0, 3.0]])
    centred = centre_on(feats, feats.mean(0))
    torch.testing.assert_close(centred, torch.tensor([[0.0, -1.0], [0.0, 1.0]]))


def test_hf_extractor_returns_cls_token_after_final_layernorm(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
    )
    model = Dinov2Model(config).eval()
    processor = BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    images = [split_image(40), split_image(40, flip=True)]
    feats = get_feature_extractor(str(tmp_path), batch_size=1)(images)
    assert isinstance(get_feature_extractor(str(tmp_path)), HFFeatureExtractor)

    with torch.no_grad():
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = model.encoder(model.embeddings(pixel_values)).last_hidden_state
        cls_after_norm = model.layernorm(hidden)[:, 0]
    expected = cls_after_norm / cls_after_norm.norm(dim=1, keepdim=True)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


def test_hf_extractor_offline_error_names_the_alternatives():
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set: the lookup would wait for network retries")
    with pytest.raises(OSError, match="--feature_extractor pixels"):
        get_feature_extractor("pogdiff-tests/no-such-model")


def test_face_extractor_on_synthetic_images():
    pytest.importorskip("dlib", reason="optional extra: pip install dlib-bin face_recognition_models")
    try:
        extractor = get_feature_extractor("face")
    except ImportError as error:
        pytest.skip(f"face models not installed: {error}")
    assert isinstance(extractor, FaceFeatureExtractor) and extractor.centre_on_real
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    feats = extractor([blank, blank, split_image(64)])
    assert feats.shape == (3, 128) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(feats[0], feats[1])  # deterministic
    # Neither image contains a face: both fall back to the whole image as the face box, and are counted.
    assert extractor.stats() == {"images": 3, "images_without_detected_face": 3}
