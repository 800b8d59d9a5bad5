"""Transfer learning for ResNet-family backbones: classification, detection, segmentation, face recognition."""
import os

# albumentations asks PyPI for a newer version at import: a network call (and a stall offline) in every run.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
