"""Image-quality metrics (FID, CLIP score, CMMD, attribute alignment) and their feature extractors.

The metrics are numpy/scipy only and import eagerly; the extractors need torch (and CLIP needs
transformers), so they are imported on first access.
"""

from typing import Any

from .metrics import alignment_accuracy, clip_score, cmmd, feature_statistics, fid_from_features, frechet_distance

_EXTRACTORS = (
    "ClipExtractor",
    "FeatureExtractor",
    "FidInceptionV3",
    "InceptionExtractor",
    "OfflineFeatureExtractor",
    "TextEmbedder",
)

__all__ = [
    "alignment_accuracy",
    "clip_score",
    "cmmd",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    *_EXTRACTORS,
]


def __getattr__(name: str) -> Any:
    if name in _EXTRACTORS:
        from . import extractors

        return getattr(extractors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
