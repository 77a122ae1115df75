"""The docs say what the code does: the configuration reference is the ``Settings`` fields."""

from pathlib import Path

import pytest

from agent.settings import Settings
from agent.settings_reference import markdown

pytestmark = pytest.mark.one_engine

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


def _blocks(text: str) -> list[str]:
    """Paragraphs, and each list item on its own."""
    import re

    return [b for para in re.split(r"\n\s*\n", text) for b in re.split(r"\n(?=\s*[-*] )", para)]


def test_figures_quoted_beside_a_committed_report_are_in_it():
    """A paragraph or list item that links a committed report (``docs/results/<run>/``) quotes only
    figures that report holds (every number with three decimals or more, as rounded from its files)."""
    import re

    results = DOCS / "results"
    checked = 0
    # README, docs/ and the hand-written report.md of each run (its generated files are the figures)
    for doc in [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md")), *sorted(results.glob("*/report.md"))]:
        for block in _blocks(doc.read_text()):
            runs = {r for r in re.findall(r"results/([a-z0-9][a-z0-9-]*)/", block) if (results / r).is_dir()}
            if doc.parent.parent == results:
                runs.add(doc.parent.name)  # a report's own text quotes its own files
            figures = re.findall(r"(?<![\d.])\d+\.\d{3,}(?!\d)", block)
            if not (runs and figures):
                continue
            held = [float(x) for r in runs for p in (results / r).iterdir()
                    if p.suffix in {".md", ".json", ".yaml"} and p != doc
                    for x in re.findall(r"-?\d+(?:\.\d+)?(?:[eE]-?\d+)?", p.read_text(errors="ignore"))]
            # a quoted figure is a held one rounded to the decimals it shows (its sign written apart)
            missing = [f for f in figures
                       if not any(abs(abs(h) - float(f)) <= 0.5 * 10 ** -len(f.split(".")[1]) + 1e-12 for h in held)]
            assert not missing, f"{doc.name}: {missing} quoted beside {sorted(runs)} but not in its files"
            checked += len(figures)
    assert checked > 0  # the check could not fail without any quoted figure
