"""Prompt templates: files under ``prompts/``, rendered by one strict, bounded Jinja sandbox.

The same environment renders at load and at run time (LangChain's jinja2 prompt templates render
non-strict, so a typo in a branch the load-time sample does not take would render blank there).
Every template is checked when it loads, so a merchandiser's mistake fails with the file and line
named, never as a prompt with a hole in it:
1. it must parse (sandboxed Jinja);
2. constructs that cannot work here are refused: ``include``, ``import``, ``extends`` (a prompt
   is the files its name lists, hashed into every page's meta);
3. it may only use the variables its prompt provides;
4. it must render a sample context under ``StrictUndefined`` (this catches ``module.tilte``).
At run time an undefined value raises ``TemplateRenderError`` (the composer falls back), and what
a template may compute is bounded: ranges, repetition, powers, the loop iterations of one render
(nested loops included) and the rendered size. The sandbox refuses attribute escapes
(``__class__``, ``__globals__``, ``str.format`` tricks); tests/test_prompts.py holds the payloads tried.
"""

from __future__ import annotations

import hashlib
import re
import traceback
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from agent.errors import ConfigError

MAX_RENDERED_CHARS = 100_000  # a prompt is a few thousand characters; far more is a runaway loop
_MAX_PRODUCT = 10_000  # the longest string or list a template's * may build
MAX_ITERATIONS = 20_000  # loop steps in one render, all loops together (a page's prompt takes a few hundred)
_steps_left: ContextVar[list[int]] = ContextVar("template_steps_left")
_REFUSED = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import",
            nodes.Extends: "extends"}


class TemplateRenderError(ConfigError):
    """A template failed while rendering a request (names the file and line)."""


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Sandboxed (values cannot be changed either), strict, and bounded in what a template may compute."""

    MAX_RANGE = 1_000
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)
        self.globals["range"] = self._range
        self.globals[_EACH] = _each
        self.globals[_CONCAT] = _concat
        for name in _WIDENING:  # filters whose output can be far longer than their input
            self.filters[name] = _guarded(name, self.filters[name])

    def call(__self, __context, __obj, *args, **kwargs):  # jinja's names: no clash with a keyword argument
        """Method calls too ("x".center(n), "{:>n}".format(x)): checked before they build a string."""
        if isinstance(getattr(__obj, "__self__", None), str):
            _precheck(getattr(__obj, "__name__", ""), (__obj.__self__, *args), kwargs)
        return _bounded(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        """``str.format`` and ``format_map``, which the sandbox wraps when they are looked up."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        @wraps(wrapped)
        def bounded(*args, **kwargs):
            _precheck("format", (value.__self__, *args), kwargs)
            return _bounded(wrapped(*args, **kwargs))
        return bounded

    def _range(self, *args: int) -> range:
        numbers = range(*args)
        if len(numbers) > self.MAX_RANGE:
            raise SecurityError(f"range of {len(numbers)} numbers: a template may loop at most {self.MAX_RANGE} times")
        return numbers

    def call_binop(self, context, operator: str, left, right):
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise SecurityError("exponent too large for a template")
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, str | list) and len(result) > _MAX_PRODUCT:
            raise SecurityError("value too large for a template")
        return result

_SAMPLE_CANDIDATE = {"handle": 1, "title": "Argan Oil Serum", "brand": "Acme", "category": "Oils", "price": 12.0,
                     "rank": 1, "source": "covisit"}
_SAMPLE_MODULE = {"type": "for_you", "title": "Picked for you", "theme": "Glow essentials", "count": 3,
                  "min_items": 2, "max_items": 4, "candidates": [_SAMPLE_CANDIDATE]}
_SAMPLE_THEME = {"type": "for_you", "title": "Picked for you", "query": "vitamin c serum"}
_SAMPLE_RULES = {"title_max_chars": 40, "title_min_chars": 3, "banned_words": ["free"], "max_items_per_brand": 2,
                 "min_categories": 3}

_SAMPLE_SHOPPER = {"products": 3, "departments": [{"name": "Skin Care", "count": 2}],
                   "categories": [{"name": "Oils", "count": 2}], "brands": [{"name": "Acme", "count": 1}],
                   "price": {"low": 4.0, "high": 12.0, "median": 8.0}, "recent": ["Argan Oil Serum"], "baskets": 2,
                   "purchase_cycle_days": 12.5, "segment": "repeat"}

# prompt name -> its messages (role, file) and the variables (with sample values) it may use
PROMPTS: dict[str, tuple[list[tuple[str, str]], dict[str, Any]]] = {
    # the system prompt is shared, so its KV cache is computed once per process (agent.backends.hf)
    "plan": (
        [("system", "system.jinja"), ("human", "plan.user.jinja")],
        {"summary": "Interacted with 3 products.", "themes": [_SAMPLE_THEME], "rules": _SAMPLE_RULES},
    ),
    "compose": (
        [("system", "system.jinja"), ("human", "compose.user.jinja")],
        {"summary": "Interacted with 3 products.", "modules": [_SAMPLE_MODULE], "rules": _SAMPLE_RULES},
    ),
    # the shopper as plan and compose tell it (their {{ summary }}), from retrieval.profile.summary_facts
    "summary": ([("human", "summary.jinja")], {"shopper": _SAMPLE_SHOPPER}),
    "repair": (
        [("human", "repair.user.jinja")],
        {"violations": [{"code": "duplicate_item", "message": "item 3 appears twice"}], "rules": _SAMPLE_RULES},
    ),
}
_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


_EACH = "_bounded_loop"  # the name every {% for %} iterates through (``_count_loops``)


def _each(iterable):
    """What every loop of a template iterates: the items, while the render has steps left."""
    left = _steps_left.get()
    for item in iterable:
        left[0] -= 1
        if left[0] < 0:
            raise SecurityError(f"a template may take at most {MAX_ITERATIONS} loop steps in one render")
        yield item


def _count_loops(parsed: nodes.Template) -> nodes.Template:
    """Route each loop through ``_each``, so nested loops cannot multiply into an endless render,
    and each ``~`` through ``_concat``, so repeated doubling cannot build a huge string."""
    for loop in parsed.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.Name(_EACH, "load", lineno=loop.lineno), [loop.iter], [], None, None,
                               lineno=loop.lineno)
    return _ToConcat().visit(parsed)


# -- strings a template builds are bounded before they are built ----------------------------------------
_CONCAT = "_bounded_concat"
_WIDENING = ("center", "indent", "wordwrap", "replace", "format", "join")


class _ToConcat(NodeTransformer):
    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        return nodes.Call(nodes.Name(_CONCAT, "load", lineno=node.lineno), [self.visit(n) for n in node.nodes],
                          [], None, None, lineno=node.lineno)


def _bounded(value):
    if isinstance(value, str | list | tuple) and len(value) > MAX_RENDERED_CHARS:
        raise SecurityError(f"value too large for a template (over {MAX_RENDERED_CHARS})")
    return value


def _concat(*parts) -> str:
    return _bounded("".join(_bounded(str(p)) for p in parts))


def _precheck(name: str, args: tuple, kwargs: dict) -> None:
    """Refuses a call whose result would be too long, before it is computed: a width or count past
    the limit, an input already past it, a replace or a format that would write too much."""
    for value in (*args, *kwargs.values()):
        _bounded(value)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDERED_CHARS:
            raise SecurityError(f"{name}: {value} is too large a width or count for a template")
    if name == "replace" and len(args) >= 3:
        text, old, new = map(str, args[:3])
        count = args[3] if len(args) > 3 else kwargs.get("count")
        times = len(text) + 1 if not old else text.count(old)
        if isinstance(count, int) and count >= 0:
            times = min(times, count)
        if len(text) + times * (len(new) - len(old)) > MAX_RENDERED_CHARS:
            raise SecurityError("replace: the result would be too long for a template")
    widths = re.findall(r"\d+", str(args[0])) if name == "format" and args else []  # in the format string
    if sum(map(int, widths)) > MAX_RENDERED_CHARS:
        raise SecurityError("format: the widths in a template's format string are too large")


def _guarded(name: str, f):
    skip = 1 if getattr(f, "jinja_pass_arg", None) else 0  # the context jinja passes first

    @wraps(f)
    def guarded(*args, **kwargs):
        _precheck(name, args[skip:], kwargs)
        return _bounded(f(*args, **kwargs))
    return guarded


def _render(path: Path, template: Template, values: dict[str, Any]) -> str:
    """One template rendered, at load (the sample) and at run time alike; any failure names the
    file and line."""
    token = _steps_left.set([MAX_ITERATIONS])
    try:
        text = template.render(**values)
    except Exception as exc:  # undefined values, refused operations, errors in filters
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        line = frames[-1].lineno if frames else 1
        raise TemplateRenderError(f"{path}:{line}: {getattr(exc, 'message', None) or exc}") from None
    finally:
        _steps_left.reset(token)
    if len(text) > MAX_RENDERED_CHARS:
        raise TemplateRenderError(f"{path}: rendered {len(text)} characters, over {MAX_RENDERED_CHARS}")
    return text


@dataclass
class Prompt:
    name: str
    parts: list[tuple[str, Path, Template]]  # (role, file, compiled template), in message order
    variables: frozenset[str]
    version: str  # hash of the template files: goes into every page's meta

    def render(self, **values: Any) -> list[dict[str, str]]:
        missing = self.variables - set(values)
        if missing:
            raise TemplateRenderError(f"prompt {self.name!r}: values missing for {sorted(missing)}")
        return [{"role": _ROLES[role], "content": _render(path, template, values)}
                for role, path, template in self.parts]


def render_summary(prompt: Prompt, facts: dict[str, Any]) -> str:
    """The summary template's text for one shopper (its whitespace at the ends trimmed)."""
    return prompt.render(shopper=facts)[0]["content"].strip()


def _line_of(source: str, name: str) -> int:
    for number, text in enumerate(source.splitlines(), start=1):
        if name in text:
            return number
    return 1


def _load_file(env: BoundedSandbox, path: Path, sample: dict[str, Any]) -> tuple[Template, set[str], str]:
    """One template file checked as the module's docstring says: (compiled template, the variables
    it uses, its source)."""
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read template ({exc.strerror})") from None
    try:
        parsed = env.parse(source, filename=str(path))
    except TemplateSyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: template syntax error: {exc.message}") from None
    for kind, word in _REFUSED.items():
        for node in parsed.find_all(kind):
            raise ConfigError(f"{path}:{node.lineno}: {{% {word} %}} is not supported in prompt templates "
                              "(a prompt is exactly the files it lists)")
    used = meta.find_undeclared_variables(parsed)
    unknown = sorted(used - set(sample))
    if unknown:
        raise ConfigError(f"{path}:{_line_of(source, unknown[0])}: unknown variable {unknown[0]!r} "
                          f"(this template may use: {', '.join(sorted(sample))})")
    # compiled with its file name, so run-time errors are traced to the template's own lines
    code = env.compile(_count_loops(parsed), path.name, str(path))
    template = env.template_class.from_code(env, code, env.make_globals(None))
    _render(path, template, sample)  # TemplateRenderError is a ConfigError
    return template, used, source


@dataclass
class TemplateFile:
    """One template file on its own (a judge's criterion), under the same checks as the prompts."""

    path: Path
    template: Template
    version: str

    def render(self, **values: Any) -> str:
        return _render(self.path, self.template, values)


def load_template(path: Path, sample: dict[str, Any]) -> TemplateFile:
    """A template that may use the variables of ``sample`` (which it must render without a hole)."""
    template, _, source = _load_file(BoundedSandbox(), Path(path), sample)
    return TemplateFile(Path(path), template, hashlib.sha1(source.encode()).hexdigest()[:10])


def load_prompt(prompts_dir: Path, name: str) -> Prompt:
    messages, sample = PROMPTS[name]
    env = BoundedSandbox()
    parts, digest, used = [], hashlib.sha1(), set()
    for role, file in messages:
        path = Path(prompts_dir) / file
        template, names, source = _load_file(env, path, sample)
        used |= names
        digest.update(source.encode())
        parts.append((role, path, template))
    return Prompt(name, parts, frozenset(used), digest.hexdigest()[:10])


def load_prompts(prompts_dir: Path) -> dict[str, Prompt]:
    return {name: load_prompt(prompts_dir, name) for name in PROMPTS}
