"""The error family, grouped by who must act.

- ``UserError``: the caller or a merchandiser fixes it (bad id, broken template, bad rule file).
  The CLI prints one line and exits with code 2.
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


class BackendError(HomepageError):
    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class PageUnavailable(HomepageError):
    """No page passing the rules can be built (see ``agent.composer``)."""


class MissingDependency(HomepageError, ImportError):
    """An optional extra that is not installed; the message gives the install command."""
