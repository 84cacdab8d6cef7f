"""Image-quality metrics (FID, CLIP score, CMMD, attribute alignment) and their feature extractors.

The metrics are numpy/scipy only and import eagerly; the extractors need torch (and CLIP needs
transformers), so they are imported on first access.
"""

from aptp.lazy import lazy_exports


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


__getattr__, __dir__ = lazy_exports(__name__, {name: ".extractors" for name in _EXTRACTORS}, __all__)
