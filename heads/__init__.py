"""Heads that plug onto any backbone; they take channel counts, never a backbone object.

Detection (`heads.detection`) wraps torchvision's detectors and is imported on its own.
"""

from .classification import ClassificationHead, Classifier, build_classifier
from .feature_list import FeatureList
from .fpn import FPN
from .segmentation import Segmenter, SemanticFPNHead

__all__ = [
    "FPN",
    "ClassificationHead",
    "Classifier",
    "FeatureList",
    "Segmenter",
    "SemanticFPNHead",
    "build_classifier",
]
