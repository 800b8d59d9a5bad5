"""Face recognition: backbone -> embedding neck -> L2-normalised embedding, trained through an ArcFace / CosFace /
combined margin head on identity folders, evaluated by the 10-fold verification protocol on LFW-style pairs. The
schema is in config.py, the task in task.py."""
