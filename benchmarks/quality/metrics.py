"""Image-quality metrics on features: FID, CLIP score, CMMD and attribute-alignment accuracy.

Every function takes features (numpy arrays, torch tensors or nested lists; anything
`numpy.asarray` accepts) and returns plain Python numbers. Nothing here loads a model: the
feature extractors live in `aptp.benchmarks.quality.extractors`, so the same formulas serve
Inception, CLIP and the offline extractor trained on the procedural dataset.

All arithmetic is float64: FID subtracts traces of the same order of magnitude, and CMMD
compares kernel means that differ in the fourth decimal place.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.linalg

from aptp.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "alignment_accuracy",
    "clip_score",
    "cmmd",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
]

# Rows per block of the pairwise kernel matrices: bounds CMMD's memory at BLOCK x N floats.
_KERNEL_BLOCK_ROWS = 1024


def _as_features(features: Any, name: str, min_rows: int = 1) -> np.ndarray:
    """Return `features` as a finite float64 (N, D) array, or raise naming the argument."""
    if hasattr(features, "detach"):  # torch tensor: leave the autograd graph and the device
        features = features.detach().cpu().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ConfigError(f"`{name}` must be a 2-D (num_samples, dim) array, got shape {array.shape}.")
    if array.shape[0] < min_rows:
        raise DatasetError(f"`{name}` needs at least {min_rows} samples, got {array.shape[0]}.")
    if not np.isfinite(array).all():
        raise DatasetError(f"`{name}` contains NaN or infinite values: check the extractor's input images.")
    return array


def _check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ConfigError(
            f"`{name_a}` has dimension {a.shape[1]} but `{name_b}` has {b.shape[1]}: "
            "both sets must come from the same feature extractor."
        )


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof=1) of a (N, D) feature set, as FID uses them.

    Returns:
        `(mu, sigma)` with shapes (D,) and (D, D), float64.
    """
    array = _as_features(features, "features", min_rows=2)
    mu = array.mean(axis=0)
    sigma = np.atleast_2d(np.cov(array, rowvar=False))
    return mu, sigma


def _max_diagonal_imag(matrix: np.ndarray) -> float:
    return float(np.max(np.abs(np.diagonal(matrix).imag))) if np.iscomplexobj(matrix) else 0.0


def frechet_distance(
    mu1: Any,
    sigma1: Any,
    mu2: Any,
    sigma2: Any,
    *,
    eps: float = 1e-6,
    imag_atol: float = 1e-3,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), the FID formula.

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))
    (Dowson & Landau 1982; Heusel et al. 2017 for its use as FID.)

    The product of two covariance matrices estimated from fewer samples than dimensions is
    singular, and its square root can come out non-finite: then `eps` is added to both
    diagonals and the root is taken again. Rounding leaves a tiny imaginary part in the
    root; it is dropped when every diagonal entry's imaginary part is within `imag_atol`,
    and an error is raised otherwise (it then means the statistics are unusable, not noisy).

    Args:
        mu1, mu2: feature means, shape (D,).
        sigma1, sigma2: feature covariances, shape (D, D).
        eps: diagonal offset used only when the plain square root is not finite.
        imag_atol: largest tolerated imaginary part on the root's diagonal.

    Returns:
        The squared Fréchet distance (what papers report as FID), a float.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,):
        raise ConfigError(f"Means must be 1-D of the same length, got {mu1.shape} and {mu2.shape}.")
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ConfigError(
            f"Covariances must be ({dim}, {dim}) to match the means, got {sigma1.shape} and {sigma2.shape}."
        )
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise DatasetError(f"`{name}` contains NaN or infinite values.")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    # A singular product (fewer samples than dimensions) gives a root that is not finite or whose
    # imaginary part is pure rounding noise, which moves with the BLAS thread count: regularise once.
    # A truly invalid covariance keeps its imaginary root and is still refused below.
    if not np.isfinite(covmean).all() or _max_diagonal_imag(covmean) > imag_atol:
        logger.warning(
            "sqrtm(sigma1 @ sigma2) is not finite or not real (singular product: fewer samples than "
            "feature dimensions?); adding %g to the covariance diagonals.",
            eps,
        )
        offset = np.eye(dim) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))

    if np.iscomplexobj(covmean):
        max_imag = _max_diagonal_imag(covmean)
        if max_imag > imag_atol:
            raise DatasetError(
                f"The square root of sigma1 @ sigma2 has an imaginary component of {max_imag:.3g} on its "
                f"diagonal (tolerance {imag_atol:g}): the covariances are not valid or far too few samples "
                f"were used for dimension {dim}. Use more samples or a lower-dimensional extractor."
            )
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # scipy warns (LinAlgWarning) on singular input yet usually returns a usable root; the
    # finiteness check in the caller decides, so the warning is only logged.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = scipy.linalg.sqrtm(matrix)
    for warning in caught:
        logger.debug("scipy.linalg.sqrtm: %s", warning.message)
    if isinstance(root, tuple):  # older scipy with disp=False semantics
        root = root[0]
    return np.asarray(root)


def fid_from_features(feats_a: Any, feats_b: Any, **kwargs: Any) -> float:
    """FID between two (N, D) feature sets (any extractor), via their means and covariances.

    Keyword arguments go to `frechet_distance`.
    """
    a = _as_features(feats_a, "feats_a", min_rows=2)
    b = _as_features(feats_b, "feats_b", min_rows=2)
    _check_same_dim(a, b, "feats_a", "feats_b")
    if max(a.shape[0], b.shape[0]) <= a.shape[1]:
        logger.warning(
            "FID on %d and %d samples of dimension %d: the covariances are rank-deficient and the "
            "value is dominated by estimation noise.",
            a.shape[0],
            b.shape[0],
            a.shape[1],
        )
    return frechet_distance(*feature_statistics(a), *feature_statistics(b), **kwargs)


# ----------------------------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------------------------


def clip_score(image_embeddings: Any, text_embeddings: Any, *, weight: float = 100.0) -> float:
    """CLIP score: mean over pairs of `weight * max(cos(image_i, text_i), 0)`.

    Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
    with w = 100 as torchmetrics' CLIPScore uses. Row i of each input is one (image, prompt)
    pair. The embeddings need not be normalised. The clip to zero is per pair, as in the
    paper's definition (torchmetrics clips the mean instead; the two agree whenever no pair
    has a negative cosine, the usual case for CLIP).
    """
    images = _as_features(image_embeddings, "image_embeddings")
    texts = _as_features(text_embeddings, "text_embeddings")
    _check_same_dim(images, texts, "image_embeddings", "text_embeddings")
    if images.shape[0] != texts.shape[0]:
        raise ConfigError(
            f"clip_score pairs rows: got {images.shape[0]} image and {texts.shape[0]} text embeddings."
        )
    norms = np.linalg.norm(images, axis=1) * np.linalg.norm(texts, axis=1)
    if np.any(norms == 0):
        raise DatasetError("clip_score got an all-zero embedding: its cosine is undefined.")
    cosine = np.sum(images * texts, axis=1) / norms
    return float(np.mean(weight * np.maximum(cosine, 0.0)))


# ----------------------------------------------------------------------------------------------
# CMMD
# ----------------------------------------------------------------------------------------------


def cmmd(x: Any, y: Any, sigma: float = 10.0, scale: float = 1000.0, *, unbiased: bool = True) -> float:
    """CMMD: `scale` times the squared MMD between two embedding sets, Gaussian RBF kernel.

    Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image
    Generation" (CVPR), Eq. 3: with k(a, b) = exp(-||a - b||^2 / (2 sigma^2)),

        MMD^2 = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
                - 2/(mn) sum_{i, j} k(x_i, y_j)

    the unbiased estimator (Gretton et al. 2012, Lemma 6). The paper applies it to CLIP
    ViT-L/14 image embeddings with sigma = 10 and reports 1000 * MMD^2. Being unbiased, the
    value can be slightly negative when both sets share a distribution. `unbiased=False`
    gives the V-statistic (means over all pairs, diagonals included), which is what the
    paper's public reference code computes; use it to compare with numbers from that code.
    """
    a = _as_features(x, "x", min_rows=2 if unbiased else 1)
    b = _as_features(y, "y", min_rows=2 if unbiased else 1)
    _check_same_dim(a, b, "x", "y")
    if sigma <= 0:
        raise ConfigError(f"cmmd needs a positive kernel bandwidth sigma, got {sigma}.")
    gamma = 1.0 / (2.0 * sigma**2)
    m, n = a.shape[0], b.shape[0]
    k_xx, k_yy, k_xy = _rbf_sum(a, a, gamma), _rbf_sum(b, b, gamma), _rbf_sum(a, b, gamma)
    if unbiased:
        # k(a, a) = 1 exactly: drop the diagonal analytically rather than via rounded values.
        mmd2 = (k_xx - m) / (m * (m - 1)) + (k_yy - n) / (n * (n - 1)) - 2.0 * k_xy / (m * n)
    else:
        mmd2 = k_xx / m**2 + k_yy / n**2 - 2.0 * k_xy / (m * n)
    return float(scale * mmd2)


def _rbf_sum(a: np.ndarray, b: np.ndarray, gamma: float) -> float:
    """Sum over all (i, j) of exp(-gamma ||a_i - b_j||^2), in row blocks to bound memory."""
    b_sq = np.einsum("ij,ij->i", b, b)
    total = 0.0
    for start in range(0, a.shape[0], _KERNEL_BLOCK_ROWS):
        block = a[start : start + _KERNEL_BLOCK_ROWS]
        block_sq = np.einsum("ij,ij->i", block, block)
        sq_dist = block_sq[:, None] + b_sq[None, :] - 2.0 * (block @ b.T)
        # The expansion can round to tiny negatives for near-identical points.
        total += float(np.exp(-gamma * np.maximum(sq_dist, 0.0)).sum())
    return total


# ----------------------------------------------------------------------------------------------
# Attribute alignment
# ----------------------------------------------------------------------------------------------

_RESERVED_KEYS = ("mean", "all")


def alignment_accuracy(
    predicted_attributes: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    target_attributes: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
) -> dict[str, float]:
    """Per-attribute accuracy of an attribute classifier on generated images, against the prompts.

    For the procedural dataset, a classifier reads shape / colour / count / position / word
    off each generated image and the prompt that produced it holds the target values.

    Both arguments are either a mapping from attribute name to per-sample labels
    (`{"shape": ["circle", ...], "count": [2, ...]}`) or a sequence of per-sample mappings
    (`[{"shape": "circle", "count": 2}, ...]`). Labels are compared with `==`. Every target
    attribute must be predicted; extra predicted attributes are ignored.

    Returns:
        `{attribute: accuracy, ..., "mean": mean of the attribute accuracies,
        "all": fraction of samples with every attribute right}`, attributes in target order.
    """
    targets = _attribute_columns(target_attributes, "target_attributes")
    predictions = _attribute_columns(predicted_attributes, "predicted_attributes")
    if not targets:
        raise ConfigError("alignment_accuracy needs at least one target attribute.")
    num_samples = len(next(iter(targets.values())))
    if num_samples == 0:
        raise DatasetError("alignment_accuracy got no samples.")

    result: dict[str, float] = {}
    all_correct = np.ones(num_samples, dtype=bool)
    for attribute, target in targets.items():
        if attribute in _RESERVED_KEYS:
            raise ConfigError(f"Attribute name {attribute!r} is reserved for the summary keys {_RESERVED_KEYS}.")
        if attribute not in predictions:
            raise ConfigError(
                f"Attribute {attribute!r} has targets but no predictions; predicted attributes: "
                f"{sorted(predictions)}."
            )
        predicted = predictions[attribute]
        if len(target) != num_samples or len(predicted) != num_samples:
            raise ConfigError(
                f"Attribute {attribute!r}: {len(predicted)} predictions and {len(target)} targets, "
                f"expected {num_samples} of each."
            )
        correct = np.array([p == t for p, t in zip(predicted, target)], dtype=bool)
        result[attribute] = float(correct.mean())
        all_correct &= correct
    result["mean"] = float(np.mean([result[attribute] for attribute in targets]))
    result["all"] = float(all_correct.mean())
    return result


def _attribute_columns(
    attributes: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], name: str
) -> dict[str, list[Any]]:
    """Normalise either accepted layout to {attribute: [label per sample]}."""
    if isinstance(attributes, Mapping):
        return {str(key): list(values) for key, values in attributes.items()}
    records = list(attributes)
    if not all(isinstance(record, Mapping) for record in records):
        raise ConfigError(
            f"`{name}` must be a mapping attribute -> labels or a sequence of per-sample mappings."
        )
    keys = list(records[0]) if records else []
    columns: dict[str, list[Any]] = {key: [] for key in keys}
    for index, record in enumerate(records):
        if set(record) != set(keys):
            raise ConfigError(
                f"`{name}`: sample {index} has attributes {sorted(record)}, sample 0 has {sorted(keys)}."
            )
        for key in keys:
            columns[key].append(record[key])
    return columns
