"""The composer agent: page schema, prompts, LLM backends, business rules and repair.

    from agent import compose_homepage
    page = compose_homepage("A2V5R832QCSOMX")
"""

from agent.errors import BackendError, ConfigError, HomepageError, InputError, PageUnavailable, UserError
from agent.schema import Homepage, PageDraft
from agent.service import build_composer, compose_homepage
from agent.settings import Settings

__all__ = [
    "BackendError", "ConfigError", "Homepage", "HomepageError", "InputError", "PageDraft", "PageUnavailable",
    "Settings", "UserError", "build_composer", "compose_homepage",
]
