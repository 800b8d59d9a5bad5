"""Object detection: Faster R-CNN with an FPN on the backbone's stages, COCO-format data, COCO box mAP. The schema is
in config.py, the task in task.py, the detector in model.py, data in data.py, COCOeval in evaluate.py."""
