"""What users see on the terminal: the `pipeline` logger's lines, and progress bars.

Every module logs to its own logger under `pipeline` (`log = logging.getLogger(__name__)`); nothing hands a print
function down. The CLI calls `show`, which gives the `pipeline` logger one console handler: info lines as they are,
on stdout; warnings and errors on stderr, behind `warning: `. Without it (the package used as a library) only warnings
reach the terminal, through Python's last-resort handler.

Progress bars show only on a terminal: tqdm redraws its line with carriage returns, and a log redirected to a file
would keep every redraw. Off a terminal the per-epoch line of the engine is the progress report.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from tqdm import tqdm

LOGGER = "pipeline"


class Console(logging.Handler):
    """Info on stdout, warnings and worse on stderr behind `warning: `, each record one write (a table stays whole)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            warning = record.levelno >= logging.WARNING
            stream = sys.stderr if warning else sys.stdout  # looked up now: a test runner may have replaced them
            stream.write(("warning: " if warning else "") + text + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: a broken stream must not stop the run
            self.handleError(record)


def show(level: int = logging.INFO) -> None:
    """The `pipeline` logger's lines on the console from `level` up (once per process, however often called)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, Console) for h in logger.handlers):
        logger.addHandler(Console())
    logger.setLevel(level)


def quiet() -> None:
    """Only errors from the `pipeline` logger in this process (data-parallel ranks other than 0: one voice)."""
    logging.getLogger(LOGGER).setLevel(logging.ERROR)


def bar(iterable: Iterable, desc: str, show: bool = True, **options) -> tqdm:
    """`iterable` with a bar on stderr when stderr is a terminal and `show` (e.g. rank 0 only); tqdm's own defaults
    hold otherwise, so TQDM_DISABLE=1 still turns bars off."""
    options = {"leave": False, "dynamic_ncols": True, "mininterval": 1.0, **options}
    if not (show and sys.stderr.isatty()):
        options["disable"] = True
    return tqdm(iterable, desc=desc, file=sys.stderr, **options)
