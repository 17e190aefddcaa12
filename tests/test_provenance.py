"""What a run records about the code that made it."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from dvlib.provenance import git_state


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_is_dirty_for_code_changes_not_for_the_chains_outputs(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    for f in ("dvlib.py", "reports/r/01.html", "figures/r/fig.png", "data/splits/r/manifest.csv"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("v1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False and clean["changed"] == []

    # re-running the chain rewrites its outputs: still the same code
    for f in ("reports/r/01.html", "figures/r/fig.png", "data/splits/r/manifest.csv"):
        (tmp_path / f).write_text("v2\n")
    (tmp_path / "reports/r/01.html").unlink()
    assert git_state(tmp_path)["dirty"] is False

    (tmp_path / "dvlib.py").write_text("v2\n")
    state = git_state(tmp_path)
    assert state["dirty"] is True and state["changed"] == ["dvlib.py"] and state["commit"] == clean["commit"]


def test_git_state_outside_a_checkout(tmp_path):
    assert git_state(tmp_path / "nowhere") == {"commit": None, "dirty": None}
