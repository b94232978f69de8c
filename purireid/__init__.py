"""purireid: Learning to Purification for unsupervised person re-identification."""

__version__ = "0.1.0"

VIEWS: tuple[str, str, str] = ("global", "upper", "lower")
