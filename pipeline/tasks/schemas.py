"""Each task's config schema by task name. Only pydantic models: `pipeline.config` validates a task file with these
without importing the task implementations (torchvision's detection models, pycocotools, matplotlib)."""
from __future__ import annotations

from pipeline.tasks.classification.config import Config as ClassificationConfig
from pipeline.tasks.detection.config import Config as DetectionConfig
from pipeline.tasks.face.config import Config as FaceConfig
from pipeline.tasks.segmentation.config import Config as SegmentationConfig

SCHEMAS = {"classification": ClassificationConfig, "detection": DetectionConfig, "face": FaceConfig,
           "segmentation": SegmentationConfig}
