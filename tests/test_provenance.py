"""A run's run.json names the code it started from: the commit, and whether tracked files differed."""

import subprocess

import pytest

from eval.provenance import checkout

pytestmark = pytest.mark.one_engine


def test_checkout_names_the_commit_and_uncommitted_changes(tmp_path, monkeypatch):
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "one")
    monkeypatch.chdir(tmp_path)
    head = git("rev-parse", "HEAD").strip()
    (tmp_path / "notes.txt").write_text("untracked files are not the code\n")
    assert checkout() == {"commit": head, "uncommitted_changes": False}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert checkout() == {"commit": head, "uncommitted_changes": True}


def test_outside_a_checkout_both_are_unknown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert checkout() == {"commit": None, "uncommitted_changes": None}
