"""Transfer learning for ResNet-family backbones: classification, detection, segmentation, face recognition."""

__version__ = "0.1.0"
