"""Heads that plug onto any backbone; they take channel counts, never a backbone object."""

from .classification import ClassificationHead, Classifier, build_classifier

__all__ = ["ClassificationHead", "Classifier", "build_classifier"]
