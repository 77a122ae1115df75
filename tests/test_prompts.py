import shutil
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.prompting import PROMPTS, load_prompt, load_prompts
from agent.settings import PROMPTS_DIR

pytestmark = pytest.mark.one_engine


@pytest.fixture
def prompts_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return folder


def test_shipped_templates_load_and_render_without_holes():
    prompts = load_prompts(PROMPTS_DIR)
    messages = prompts["compose"].render(**PROMPTS["compose"][1])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "1. Argan Oil Serum\n" in messages[1]["content"] and "Acme" not in messages[1]["content"]
    assert "{{" not in messages[0]["content"] + messages[1]["content"]
    assert len(prompts["compose"].version) == 10


def test_candidate_lines_are_cut_at_a_word_boundary():
    prompt = load_prompts(PROMPTS_DIR)["compose"]
    values = dict(PROMPTS["compose"][1])
    long = {"handle": 1, "title": "Organic Rosehip Seed Oil for Face and Hair", "brand": "Acme", "category": "Oils",
            "price": 12.0}
    values["modules"] = [{**values["modules"][0], "candidates": [long]}]
    assert "\n1. Organic Rosehip Seed\n" in prompt.render(**values)[1]["content"]  # 24 characters at most


def test_the_full_template_set_still_loads():
    """prompts/full: brand and price on every candidate line (the earlier, longer prompt)."""
    messages = load_prompts(PROMPTS_DIR / "full")["compose"].render(**PROMPTS["compose"][1])
    assert "1. Argan Oil Serum | Acme | $12" in messages[1]["content"]


def test_the_signal_set_tells_each_candidates_retrieval_rank_and_source(composer, sample_users):
    """prompts/signal: each candidate line ends with its place in retrieval's order and its source —
    the same place whatever order the lines are in (a model trained on shuffled lines reads it)."""
    import random
    import re

    from agent.stages.draft import draft_messages
    from retrieval.sources import SOURCES

    signal = load_prompts(PROMPTS_DIR / "signal")["compose"]
    history = composer.retriever.history(next(u for u in sample_users if not composer.retriever.history(u).is_cold))
    pools = composer.pools(history)
    line = re.compile(r"^(\d+)\. .* \[#(\d+) (\w+)\]$", re.M)

    def told(pools) -> list[dict[str, tuple[int, str]]]:
        text = draft_messages(signal, composer.rules, history, pools, composer.retriever.products)[1]["content"]
        blocks = text.split("\nModule ")[1:]
        return [{module.candidates[int(h) - 1].item_id: (int(rank), source) for h, rank, source in line.findall(b)}
                for module, b in zip(pools.written(), blocks, strict=True)]

    before = told(pools)
    for module, ranks in zip(pools.written(), before, strict=True):
        assert len(ranks) == len(module.candidates)
        # in pool order the ranks rise with the handle (equal scores share a rank)
        in_pool_order = [ranks[c.item_id][0] for c in module.candidates]
        assert in_pool_order == sorted(in_pool_order)
        assert ranks[module.candidates[0].item_id][0] == 1
        assert {source for _, source in ranks.values()} <= set(SOURCES)
    for module in pools.written():
        random.Random(0).shuffle(module.candidates)
    assert told(pools) == before  # shuffled lines, the same ranks and sources


def test_syntax_error_names_file_and_line(prompts_copy: Path):
    path = prompts_copy / "compose.user.jinja"
    path.write_text("Shopper: {{ summary }}\n{% for module in modules %}\n{{ module.type }\n")
    with pytest.raises(ConfigError, match=r"compose\.user\.jinja:3: template syntax error"):
        load_prompt(prompts_copy, "compose")


def test_unknown_variable_names_file_line_and_variable(prompts_copy: Path):
    path = prompts_copy / "compose.user.jinja"
    path.write_text("Shopper: {{ summary }}\n\nAge: {{ user_age }}\n")
    with pytest.raises(ConfigError, match=r"compose\.user\.jinja:3: unknown variable 'user_age'"):
        load_prompt(prompts_copy, "compose")


def test_misspelt_attribute_is_caught_at_load(prompts_copy: Path):
    path = prompts_copy / "compose.user.jinja"
    path.write_text("Shopper: {{ summary }}\n{% for module in modules %}\n{{ module.tilte }}\n{% endfor %}\n")
    with pytest.raises(ConfigError, match=r"compose\.user\.jinja:3: .*tilte"):
        load_prompt(prompts_copy, "compose")


def test_sandbox_refuses_unsafe_access(prompts_copy: Path):
    (prompts_copy / "repair.user.jinja").write_text("{{ rules.__class__.__mro__ }}\n")
    with pytest.raises(ConfigError, match=r"repair\.user\.jinja"):
        load_prompt(prompts_copy, "repair")


def test_missing_template_file(prompts_copy: Path):
    (prompts_copy / "repair.user.jinja").unlink()
    with pytest.raises(ConfigError, match=r"repair\.user\.jinja: cannot read template"):
        load_prompt(prompts_copy, "repair")


# Known Jinja sandbox escapes and resource attacks: each is refused when the template loads.
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__bases__[0].__subclasses__() }}",
    "{{ rules.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__.__builtins__.open('/etc/passwd').read() }}",
    "{{ config.items() }}",
    "{{ request.application.__globals__ }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(rules) }}",
    "{{ rules.title_max_chars.__class__.__subclasses__() }}",
    "{{ violations.pop() }}{{ violations.append(1) }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{% from 'x' import y %}",
    "{% extends '/etc/passwd' %}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ 'a' * 10**8 }}",
    "{{ 2 ** 10000 }}",
    "{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}{% endfor %}{% endfor %}"
    "{% endfor %}",
    "{% for a in 'x' * 9000 %}{% for b in 'x' * 9000 %}{% endfor %}{% endfor %}",
    "{% for v in violations recursive %}{{ loop(violations) }}{% endfor %}",
]


@pytest.mark.parametrize("payload", ESCAPES)
def test_sandbox_escapes_and_runaway_templates_are_refused(prompts_copy: Path, payload: str):
    (prompts_copy / "repair.user.jinja").write_text(payload + "\n")
    with pytest.raises(ConfigError, match=r"repair\.user\.jinja"):
        load_prompt(prompts_copy, "repair")
