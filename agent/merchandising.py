"""The merchandiser's files as versions: a draft beside what is live, checked the way serving loads
it, published at once, and rolled back to any earlier version.

The set is the prompt templates the composer renders, the rules and the skeleton. What is live is
the files the settings name (``prompts_dir``, ``rules_file``, ``skeleton_file``); the console keeps
its draft and its history in the store, under ``console/``:

    console/draft/             the working draft: one copy of the whole set
    console/versions/0001/     each published set, with version.json (id, author, time, message, diff)

A version's id is a digest of the set's contents, so a page's ``meta.config_version`` names what it
was composed with whoever changed the files. Publishing writes the draft over the live files and
reloads the service; rolling back publishes an earlier version's files as a new version, so the
history only grows. A draft that does not load has nothing published.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from agent.errors import ConfigError, UserError
from agent.prompting import PROMPTS, load_prompts
from agent.rules import Rules, check_skeleton
from agent.skeleton import Skeleton

RULES, SKELETON = "rules.yaml", "skeleton.yaml"
TEMPLATES = tuple(sorted({file for messages, _ in PROMPTS.values() for _, file in messages}))
FILES = (*TEMPLATES, RULES, SKELETON)
CONSOLE_DIR = "console"
_WHERE = re.compile(r"^(?P<path>[^:;]+?)(?::(?P<line>\d+))?: (?P<message>.*)$", re.S)


class NotPublishable(UserError):
    """The draft does not load, or is what is live already."""


def live_paths(settings) -> dict[str, Path]:
    """Where serving reads each file of the set."""
    return {**{name: Path(settings.prompts_dir) / name for name in TEMPLATES},
            RULES: Path(settings.rules_file), SKELETON: Path(settings.skeleton_file)}


def read_set(paths: dict[str, Path]) -> dict[str, str]:
    return {name: path.read_text(encoding="utf-8") for name, path in paths.items()}


def version_id(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\0".encode())
    return digest.hexdigest()[:12]


def live_version(settings) -> str:
    """The id of the set serving reads now ("" where a file cannot be read: loading it says why)."""
    try:
        return version_id(read_set(live_paths(settings)))
    except OSError:
        return ""


def in_folder(settings, folder: Path):
    """The settings with the set read from ``folder`` (a draft or a version)."""
    return settings.model_copy(update={"prompts_dir": folder, "rules_file": folder / RULES,
                                       "skeleton_file": folder / SKELETON})


@dataclass
class Problem:
    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}{f':{self.line}' if self.line else ''}: {self.message}"


def problems_of(folder: Path, products: dict) -> list[Problem]:
    """Why the set in ``folder`` would not serve (empty: it loads), each with its file and line."""
    try:
        load_prompts(folder)
        rules = Rules.load(folder / RULES)
        skeleton = Skeleton.load(folder / SKELETON)
        check_skeleton(rules, skeleton, products)
    except ConfigError as exc:
        problems = []
        for part in str(exc).split("; "):
            match = _WHERE.match(part)
            if match and Path(match["path"]).name in FILES:
                line = int(match["line"]) if match["line"] else None
                problems.append(Problem(Path(match["path"]).name, line, match["message"]))
            else:
                problems.append(Problem("", None, part))
        return problems
    return []


def unified_diff(before: dict[str, str], after: dict[str, str]) -> str:
    lines = []
    for name in FILES:
        lines += difflib.unified_diff(before.get(name, "").splitlines(keepends=True),
                                      after.get(name, "").splitlines(keepends=True), f"live/{name}", f"new/{name}")
    return "".join(lines)


class Version(BaseModel):
    """One published set, as ``version.json`` records it."""

    number: int
    id: str
    author: str
    time: float
    message: str
    diff: str
    rollback_of: int | None = None


class Console:
    """The draft and the published versions of one store's merchandiser files."""

    def __init__(self, settings, root: Path | None = None):
        self.settings = settings
        self.root = Path(root or Path(settings.store_dir) / CONSOLE_DIR)
        self.draft_dir = self.root / "draft"
        self.versions_dir = self.root / "versions"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One change at a time, across the service's workers."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- the draft ---------------------------------------------------------------------------------
    def draft(self) -> dict[str, str]:
        """The draft's files (a copy of what is live until someone edits it)."""
        with self._locked():
            return self._draft()

    def _draft(self) -> dict[str, str]:
        if not self.draft_dir.is_dir():
            self._write_folder(self.draft_dir, read_set(live_paths(self.settings)))
        return read_set({name: self.draft_dir / name for name in FILES})

    def save(self, name: str, content: str) -> None:
        if name not in FILES:
            raise KeyError(name)
        self.draft()
        with self._locked():
            _write_atomically(self.draft_dir / name, content)

    def discard(self) -> None:
        """The draft starts again from what is live."""
        with self._locked():
            shutil.rmtree(self.draft_dir, ignore_errors=True)

    # -- versions ----------------------------------------------------------------------------------
    def versions(self) -> list[Version]:
        """Published versions, oldest first; the first is the set as the console first found it."""
        if not self.versions_dir.is_dir():
            return []
        found = []
        for folder in sorted(self.versions_dir.iterdir()):
            with contextlib.suppress(OSError, ValidationError):
                found.append(Version.model_validate_json((folder / "version.json").read_text()))
        return found

    def version_files(self, number: int) -> dict[str, str]:
        folder = self.versions_dir / f"{number:04d}"
        if not (folder / "version.json").is_file():
            raise KeyError(number)
        return read_set({name: folder / name for name in FILES})

    def publish(self, author: str, message: str, products: dict, reload: Callable[[], object]) -> Version:
        """The draft becomes live: checked, recorded, written over the live files, then ``reload``
        (the service swaps its composer). A reload that fails puts the live files back."""
        with self._locked():  # the draft checked is the draft published: no save in between
            files = self._draft()
            problems = problems_of(self.draft_dir, products)
            if problems:
                raise NotPublishable(f"the draft does not load: {problems[0]}")
            return self._make_live(files, author, message, reload)

    def rollback(self, number: int, author: str, products: dict, reload: Callable[[], object]) -> Version:
        """An earlier version's files, live again as a new version."""
        files = self.version_files(number)
        with self._locked():
            return self._make_live(files, author, f"roll back to version {number}", reload, rollback_of=number)

    def _make_live(self, files: dict[str, str], author: str, message: str, reload: Callable[[], object],
                   rollback_of: int | None = None) -> Version:
        """(With the lock held.)"""
        paths = live_paths(self.settings)
        live = read_set(paths)
        if version_id(files) == version_id(live):
            raise NotPublishable(f"version {version_id(live)} is live already: nothing to publish")
        history = self.versions()
        if not history:  # the set as found, so that it can be rolled back to
            history.append(self._record(live, "(found)", "the files as the console first found them", "", None))
        version = self._record(files, author, message, unified_diff(live, files), rollback_of,
                               number=history[-1].number + 1)
        for name, content in files.items():
            _write_atomically(paths[name], content)
        try:
            reload()
        except Exception:
            for name, content in live.items():
                _write_atomically(paths[name], content)
            shutil.rmtree(self.versions_dir / f"{version.number:04d}")
            raise
        return version

    def _record(self, files: dict[str, str], author: str, message: str, diff: str, rollback_of: int | None,
                number: int = 1) -> Version:
        version = Version(number=number, id=version_id(files), author=author, time=time.time(), message=message,
                          diff=diff, rollback_of=rollback_of)
        folder = self.versions_dir / f"{number:04d}"
        self._write_folder(folder, files)
        _write_atomically(folder / "version.json", version.model_dump_json(indent=2))
        return version

    @staticmethod
    def _write_folder(folder: Path, files: dict[str, str]) -> None:
        """The whole set at once: written beside, then renamed into place."""
        partial = folder.with_name(f".{folder.name}.{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name, content in files.items():
            (partial / name).write_text(content, encoding="utf-8")
        partial.rename(folder)


def _write_atomically(path: Path, content: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(content, encoding="utf-8")
    partial.replace(path)
