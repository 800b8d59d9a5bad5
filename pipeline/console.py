"""What users see on the terminal: the `pipeline` logger's lines, and progress bars.

Every module logs to its own logger under `pipeline` (`log = logging.getLogger(__name__)`); nothing hands a print
function down. The CLI calls `show`, which gives the `pipeline` logger one console handler: info lines as they are,
on stdout; warnings and errors on stderr, behind `warning: `. Without it (the package used as a library) only warnings
reach the terminal, through Python's last-resort handler.

A run also keeps what was said in a log file of its own (`recording`): the console's lines with their times, and
whatever other loggers it names (MLflow's, whose INFO lines stay off the console).

Progress bars show only on a terminal: tqdm redraws its line with carriage returns, and a log redirected to a file
would keep every redraw. Off a terminal the per-epoch line of the engine is the progress report.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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


class Recording(logging.Handler):
    """Log records kept in memory until `to(path)` names their file, then written there as they come."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.pending: list[logging.LogRecord] = []
        self.file = None

    def to(self, path: Path) -> None:
        """Write what was said so far to `path`, and everything said from now on (the file is appended to: a resumed
        run's log continues)."""
        self.file = Path(path).open("a")
        for record in self.pending:
            self._write(record)
        self.pending.clear()

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.pending.append(record)
        else:
            self._write(record)

    def _write(self, record: logging.LogRecord) -> None:
        try:
            self.file.write(self.format(record) + "\n")
            self.file.flush()
        except Exception:  # noqa: BLE001 - a full disk must not stop the run it logs
            self.handleError(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


@contextmanager
def recording(extra_loggers: Sequence[str] = ()) -> Iterator[Recording]:
    """Keep the `pipeline` logger's records (from INFO up) and those of `extra_loggers` while the block runs; they
    reach a file once `to(path)` is called, and are dropped if it never is (a run that never started)."""
    handler = Recording()
    loggers = [logging.getLogger(name) for name in (LOGGER, *extra_loggers)]
    ours = loggers[0]
    level = ours.level
    if level == logging.NOTSET:  # info records must exist to be kept (a process that is `quiet` keeps its level)
        ours.setLevel(logging.INFO)  # without a console handler, none of them prints
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        ours.setLevel(level)
        handler.close()


def bar(iterable: Iterable, desc: str, show: bool = True, **options) -> tqdm:
    """`iterable` with a bar on stderr when stderr is a terminal and `show` (e.g. rank 0 only); tqdm's own defaults
    hold otherwise, so TQDM_DISABLE=1 still turns bars off."""
    options = {"leave": False, "dynamic_ncols": True, "mininterval": 1.0, **options}
    if not (show and sys.stderr.isatty()):
        options["disable"] = True
    return tqdm(iterable, desc=desc, file=sys.stderr, **options)
