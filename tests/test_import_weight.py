"""Reading a task file stays light: `pipeline.config` imports no task implementation."""
import subprocess
import sys

import pytest

HEAVY = ("torchvision.models.detection", "pycocotools", "matplotlib")


@pytest.mark.parametrize("module", ["pipeline.config", "pipeline.tasks.registry"])
def test_config_imports_no_task_implementation(module):
    # -X importtime lists every module the import loads, on stderr, one per line ("import time: ... | name").
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                         text=True, check=True).stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.splitlines() if line.startswith("import time:")}
    assert "pipeline.config.sections" in loaded  # the listing is real: the schemas' base was loaded
    assert not [m for m in loaded if m.startswith(HEAVY)], sorted(m for m in loaded if m.startswith(HEAVY))


def test_the_registry_does_load_them():
    """The other side of the same check: it would see a heavy import if there were one (a task's implementation is
    imported when the registry builds the task)."""
    code = "from pipeline.tasks import registry; registry.get('detection')"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                         capture_output=True, text=True, check=True).stderr
    assert "pycocotools" in out and "torchvision.models.detection" in out
