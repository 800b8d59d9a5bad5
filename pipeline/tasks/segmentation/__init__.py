"""Semantic segmentation: DeepLabV3 (ASPP on a dilated backbone, optional aux head); mIoU from a confusion matrix.

The schema is in config.py, the task in task.py, data layouts (VOC, images/ + masks/ folders, COCO json) in data.py,
the model in model.py, the metrics in metrics.py and the report figures in report.py."""
