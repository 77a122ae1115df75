"""The error family, grouped by who must act.

- ``UserError``: the caller or a merchandiser fixes it (bad id, broken template, bad rule file).
  The CLI prints one line and exits with code 2.
- ``DraftRejected``: a model draft broke the rules; the composer repairs it. Carries the violations
  and the raw model text.
- ``BackendError``: the LLM backend failed; ``retryable`` says whether trying again can help.
  The composer never lets it reach a caller: the deterministic page answers instead.
- ``PageUnavailable``: no valid page can be built at all (an empty catalogue, rules the catalogue
  cannot meet). With ``InputError``, the only errors ``Composer.compose`` raises.
"""

from __future__ import annotations


class HomepageError(Exception):
    """Base of every error this project raises on purpose."""


class UserError(HomepageError):
    pass


class ConfigError(UserError):
    """A settings, template, rule or skeleton file that cannot be used; the message names the file
    and the field or line."""


class InputError(UserError):
    """A request the caller must fix (an empty or malformed user id, ...)."""


class DraftRejected(HomepageError):
    def __init__(self, violations: list, raw: str):
        super().__init__(f"{len(violations)} rule violation(s)")
        self.violations = violations
        self.raw = raw


class BackendError(HomepageError):
    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class PageUnavailable(HomepageError):
    """No page passing the rules can be built (see ``agent.composer``)."""


class MissingDependency(HomepageError, ImportError):
    """An optional extra that is not installed; the message gives the install command."""
