"""The docs say what the code does: the configuration reference is the ``Settings`` fields."""

from pathlib import Path

from agent.settings import Settings
from agent.settings_reference import markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_configuration_reference_is_current():
    assert (DOCS / "configuration.md").read_text() == markdown(), (
        "docs/configuration.md is stale: homepage settings --markdown > docs/configuration.md")


def test_every_setting_is_described_in_the_reference():
    text = (DOCS / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"
        assert f"| `{name}` | `HOMEPAGE_{name.upper()}` |" in text


def test_the_readme_is_short_starts_with_the_quickstart_and_its_links_resolve():
    import re

    readme = (DOCS.parent / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert re.findall(r"(?m)^## (.+)$", readme)[0] == "Quickstart"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        assert (DOCS.parent / target).exists(), target
