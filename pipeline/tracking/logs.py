"""MLflow's own log lines: it prints them through console handlers it installs on import. Off the console below
warnings, they still reach other handlers (a run's log file, pipeline/console.py)."""
from __future__ import annotations

import logging

import mlflow  # noqa: F401  (importing MLflow installs the handlers adjusted here)

LOGGERS = ("mlflow", "alembic")  # MLflow's loggers, and its database migrations'


def quiet_console(level: int = logging.WARNING) -> None:
    """MLflow's console handlers print from `level` up; its loggers keep their levels, so its INFO records (database
    creation, model validation) still reach the run's log."""
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(level)
