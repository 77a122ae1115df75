import json
import subprocess
import sys

from agent.schema import Homepage
from homepage.cli import main


def test_bad_user_ids_exit_2_with_one_line(tmp_path):
    for bad in ["", "no spaces please"]:
        result = subprocess.run([sys.executable, "-m", "homepage", "--store", str(tmp_path), "compose", bad],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("homepage: user id")


def test_compose_on_an_empty_store_says_to_ingest(tmp_path, capsys):
    assert main(["--store", str(tmp_path / "empty"), "compose", "A1"]) == 2
    assert "run `homepage ingest` first" in capsys.readouterr().err


def test_compose_json_is_a_valid_homepage(settings, composer, sample_users, monkeypatch, capsys):
    monkeypatch.setenv("HOMEPAGE_MODEL_CACHE_DIR", str(settings.model_cache_dir))
    assert main(["--store", str(settings.store_dir), "compose", sample_users[1], "--json"]) == 0
    page = Homepage.model_validate_json(capsys.readouterr().out)
    ids = page.item_ids()
    assert page.user_id == sample_users[1] and len(ids) == len(set(ids))
    assert all(i in composer.retriever.products for i in ids)
    # the CLI runs with the default time budget: on a busy machine the page may come from the fallback
    assert json.loads(page.model_dump_json())["meta"]["path"] in {"llm", "repaired", "fallback"}


def test_help_shows_an_example(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert "homepage compose A2V5R832QCSOMX --json" in capsys.readouterr().out
