"""Tracking records that could not reach the MLflow server, kept on disk in order until they are sent.

`RUN_DIR/tracking_outbox.jsonl` starts with a header line (run id, tracking URI) followed by one JSON record per
call: metrics of a step, tags, an artifact file, the final status. The file survives a crash; `pipeline sync RUN_DIR`
sends what is left once the server is back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

NAME = "tracking_outbox.jsonl"


class Outbox:
    def __init__(self, path: Path, run_id: str, uri: str) -> None:
        self.path, self.run_id, self.uri = Path(path), run_id, uri
        self.pending: list[dict] = []

    @classmethod
    def read(cls, path: Path) -> Outbox:
        """The outbox file at `path` (as written by a run), with its records pending."""
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if not lines or "run_id" not in lines[0]:
            raise ValueError(f"{path} has no header line")
        box = cls(path, lines[0]["run_id"], lines[0]["uri"])
        box.pending = lines[1:]
        return box

    def append(self, record: dict) -> None:
        if not self.path.exists():
            self._write([])
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.pending.append(record)

    def sent(self, count: int) -> None:
        """The first `count` pending records reached the server: drop them (the file goes once it is empty)."""
        self.pending = self.pending[count:]
        if self.pending:
            self._write(self.pending)
        else:
            self.path.unlink(missing_ok=True)

    def _write(self, records: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"run_id": self.run_id, "uri": self.uri}, *records]))
        os.replace(tmp, self.path)
