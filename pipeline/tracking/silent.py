"""The tracker of data-parallel ranks other than 0 (torchrun): rank 0 logs for every rank, so these calls do
nothing; it knows the run id rank 0 opened."""
from __future__ import annotations

from pathlib import Path

from pipeline.tracking.run import DatasetRecord


class Silent:
    """The tracker of ranks other than 0 under torchrun: rank 0 logs for every rank, these calls do nothing."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def __enter__(self) -> Silent:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def keep_offline(self, outbox_path: Path) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None

    def set_tags(self, tags: dict[str, str]) -> None:
        return None

    def log_params(self, params: dict[str, str]) -> None:
        return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        return None

    def log_text(self, text: str, artifact_file: str) -> None:
        return None

    def log_datasets(self, datasets: list[DatasetRecord]) -> None:
        return None
