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


def test_a_wrong_setting_is_refused_in_one_line_naming_it(monkeypatch, capsys):
    cases = [
        ({"HOMEPAGE_RRF_K": "0"},
         "setting rrf_k (HOMEPAGE_RRF_K or homepage.toml): Input should be greater than or equal to 1"),
        # read by the chosen backend's options class, refused when the settings load, not when the model does
        ({"HOMEPAGE_DTYPE": "float16"}, "setting dtype (HOMEPAGE_DTYPE or homepage.toml), read by backend "
                                        "'transformers': Input should be 'float32' or 'bfloat16'"),
        ({"HOMEPAGE_BACKEND": "openai", "HOMEPAGE_OPENAI_BASE_URL": "localhost:8000"},
         "setting openai_base_url (HOMEPAGE_OPENAI_BASE_URL or homepage.toml), read by backend 'openai': "
         "expected an http:// or https:// address"),
        ({"HOMEPAGE_BACKEND": "llamacpp"}, "unknown LLM backend 'llamacpp'; known: ['openai', 'transformers', 'vllm']"),
        ({"HOMEPAGE_SOURCE_OPTIONS": '{"covisit": {"window": 0}}'},
         "covisit: window: Input should be greater than or equal to 1"),
    ]
    for env, expected in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert main(["settings"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("homepage: ") and expected in err, err
        for name in env:
            monkeypatch.delenv(name)


def test_each_backend_reads_its_own_options_and_vllm_serves_float32_as_bfloat16():
    from agent.backends import backend_options
    from agent.backends.options import OpenAIOptions, TransformersOptions, VLLMOptions
    from agent.settings import Settings

    settings = Settings(adapter="some/adapter")
    local = backend_options(settings)
    assert isinstance(local, TransformersOptions) and local.dtype == "float32" and local.adapter == "some/adapter"
    vllm = backend_options(settings.model_copy(update={"backend": "vllm"}))
    assert isinstance(vllm, VLLMOptions) and vllm.dtype == "bfloat16" and not hasattr(vllm, "speculate")
    remote = backend_options(settings.model_copy(update={"backend": "openai"}))
    assert isinstance(remote, OpenAIOptions) and remote.openai_base_url == settings.openai_base_url


def test_demo_ingests_the_sample_and_prints_pages(settings, ingested, copy_store, tmp_path, monkeypatch, capsys):
    # the Quickstart's command; its --users counts the shoppers shown (it once reached ingest as a file name)
    store = copy_store(settings.store_dir, tmp_path / "store")
    monkeypatch.setenv("HOMEPAGE_MODEL_CACHE_DIR", str(settings.model_cache_dir))
    assert main(["--store", str(store), "demo", "--users", "1"]) == 0
    out = capsys.readouterr().out
    assert f"store: {store}" in out and "events new in the store: 0" in out
    pages = [line for line in out.splitlines() if line.startswith("== ")]
    assert len(pages) == 2 and pages[1].startswith("== new-visitor-0001  [")
