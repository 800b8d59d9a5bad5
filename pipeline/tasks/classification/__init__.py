"""Image classification: backbone -> global average pool -> dropout -> linear head; top-1 / top-5 / per-class
accuracy. The schema is in config.py, the task in task.py, data layouts in data.py."""
