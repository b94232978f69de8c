"""purireid: Learning to Purification for unsupervised person re-identification."""

__version__ = "0.1.0"

VIEWS: tuple[str, str, str] = ("global", "upper", "lower")


def __getattr__(name: str):
    # `purireid.FeatureExtractor` without importing torch on `import purireid`.
    if name == "FeatureExtractor":
        from purireid.serving.api import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'purireid' has no attribute {name!r}")
