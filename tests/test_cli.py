"""The CLI as a newcomer meets it: --version, whole descriptions in the help, pointers to the config keys, and
progress bars only where a terminal shows them."""
import io
import sys
from importlib.metadata import version

from click.testing import CliRunner

from pipeline import console
from pipeline.cli import main


def test_version_prints_the_package_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"pipeline {version('resnet-transfer-pipeline')}\n"


def test_top_level_help_shows_whole_descriptions():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # wrapped lines joined back
    for name, command in main.commands.items():
        first_sentence = " ".join(command.help.split("\n\n")[0].split())
        assert first_sentence in text, name


def test_run_help_names_where_the_keys_are():
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0 and "pipeline config TASK_FILE" in result.output


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a redirected log
    assert console.bar(range(3), "epoch").disable
    monkeypatch.setattr(sys, "stderr", _Terminal())
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not console.bar(range(3), "epoch").disable
    assert console.bar(range(3), "epoch", show=False).disable  # e.g. ranks other than 0
