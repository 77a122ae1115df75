"""A fine-tuning run, as one YAML file (``homepage finetune CONFIG``); ``homepage finetune fields``
prints every field with its help. Errors name the file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.configfile import load_yaml_model

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
SAMPLE_DATA = Path(__file__).resolve().parent.parent / "data" / "sample"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherConfig(_Strict):
    kind: Literal["template", "backend"] = Field(
        "template", description="where the target copy comes from: 'template' (the copy templates below) or "
        "'backend' (a stronger model writes the titles through an LLM backend; its picks are not used)")
    copy_templates: dict[str, str] = Field(
        default_factory=lambda: {"for_you": "Your {department} picks",
                                 "bought_together": "Goes with your {department} routine"},
        description="module type -> title template; {department}, {category}, {brand} are the shopper's top "
        "ones. A module without a template, or a title that breaks the rules, keeps the skeleton's title")
    backend: str = Field("openai", description="teacher backend when kind=backend: transformers | vllm | openai")
    model: str | None = Field(None, description="teacher model when kind=backend (path, package:NAME or served name)")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="teacher server for backend=openai")


class LoraSettings(_Strict):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names the adapter wraps (all projections of a Llama/Qwen block by default)")


class TrainSettings(_Strict):
    epochs: float = Field(1.0, gt=0, description="passes over the examples (max_steps wins when set)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    batch_size: int = Field(1, ge=1, description="examples per device per step")
    grad_accum: int = Field(4, ge=1, description="steps accumulated per optimiser update")
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_seq_len: int = Field(1536, ge=64, description="longer examples are skipped (and counted), never cut")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPUs)")
    save_steps: int = Field(10, ge=1, description="a checkpoint every N optimiser steps (resume picks the last)")
    logging_steps: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (unset: torch's default)")


class FinetuneConfig(_Strict):
    data: Path = Field(SAMPLE_DATA, description="folder with items.csv and interactions.csv (the logs)")
    out: Path = Field(Path(".homepage/finetune/smoke"), description="work folder: examples, stores, "
                      "checkpoints, and the adapter in out/adapter")
    base_model: str | None = Field(None, description="model to adapt (unset: the serving model setting)")
    gguf_file: str | None = Field(None, description="GGUF file inside the base model folder (found if unset)")
    users: int | None = Field(None, ge=1, description="training users sampled (seeded); unset: all with a target")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="examples held out for the evaluation loss")
    seed: int = 0
    objective: Literal["page", "handles", "handles_listwise"] = Field(
        "page", description="what the loss reads: 'page' — the whole draft (titles and every handle); 'handles' — "
        "only each module's first handle, where it is an item the shopper bought next (the verbalizer's target: "
        "serving reads every handle's score at that position); examples without one are skipped; "
        "'handles_listwise' — the same positions, the softmax taken over the module's candidate handles only (a "
        "listwise loss: every step is spent on which candidate, none on the output's format)")
    shuffle_candidates: bool = Field(
        False, description="shuffle each module's candidates (seeded, per user) before the prompt is rendered, so "
        "the model cannot learn to copy the pool's retrieval order: its handle scores must come from the products "
        "and the history; serving blends them with pool order through handle_prior")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    task: Literal["page", "judge", "judge_head"] = Field(
        "page", description="what is learned: 'page' — the composer's drafts; 'judge' — an adapter writing a judge's "
        "verdicts on known-answer cases of training users (eval/judge/training.py); 'judge_head' — a Bradley-Terry "
        "scoring head on the model's final state from the same cases, no adapter (eval/judge/head.py; the lora and "
        "train sections are not read). judge_suite names the criteria and the users kept out")
    judge_suite: Path | None = Field(None, description="the judge suite whose criteria and users a judge follows "
                                     "(task: judge, judge_head)")
    method: Literal["lora", "full"] = Field(
        "lora", description="'lora' — a LoRA adapter over the frozen base, saved in out/adapter (HOMEPAGE_ADAPTER); "
        "'full' — every weight of the base trained, saved as a plain model folder in out/model (HOMEPAGE_MODEL; "
        "the lora section is not read). Full fine-tuning keeps AdamW's two moments for every weight: ~16 bytes "
        "a parameter (2.2 GB for the packaged 135M model)")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)


def load_config(path: Path) -> FinetuneConfig:
    """A config file; relative ``data`` and ``out`` are taken from the current directory."""
    return load_yaml_model(Path(path), FinetuneConfig)


def field_help() -> list[str]:
    """Every field, dotted, with its default and help (``homepage finetune fields``)."""
    lines = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            lines.append(f"{prefix}{name} = {default!r}" + (f"  # {info.description}" if info.description else ""))

    walk(FinetuneConfig, "")
    return lines
