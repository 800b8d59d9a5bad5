"""The mutation check of tests/mutations.py in the slow lane: every deliberate one-line bug is caught by its tests."""
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a dozen mutants, each running its guarding tests (about 15 minutes on two cores)
def test_every_mutant_is_killed():
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("mutations.py"))], capture_output=True,
                          text=True)
    print(done.stdout)  # the table, shown with -rP or when the test fails
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
