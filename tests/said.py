"""What the pipeline says on the console, for tests: the `pipeline` logger's records as its console handler prints
them (warnings behind `warning: `). The `said` fixture (conftest.py) covers one test; `said_lines` any block."""
import logging
from collections.abc import Iterator
from contextlib import contextmanager


def line(record: logging.LogRecord) -> str:
    return ("warning: " if record.levelno >= logging.WARNING else "") + record.getMessage()


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(line(record))


@contextmanager
def said_lines() -> Iterator[list[str]]:
    """The lines said inside the block, appended as they come."""
    logger = logging.getLogger("pipeline")
    lines: list[str] = []
    handler, level = _Collect(lines), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
