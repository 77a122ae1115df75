"""LoRA training with peft and the transformers Trainer: checkpoints every ``save_steps``, resume
from the last one after an interruption, and the adapter saved with its metadata.

The loss is on the completion alone (objective ``page``: the page JSON and the end-of-turn token;
``handles``: only the first handle of each module whose first item the shopper bought next, the
position where serving reads every handle's score; ``handles_listwise``: those positions, the
softmax over the module's candidate handles alone), and logits are only computed from the first
labelled position on; the prompt is encoded by the serving code's own ``chat_prompt_ids``, so the
model trains on exactly what it will read.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from agent.adapters import write_metadata
from agent.backends.hf import chat_prompt_ids, load_base
from agent.errors import ConfigError
from agent.settings import Settings
from finetune.config import FinetuneConfig

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"  # method: full
CHECKPOINTS_DIR = "checkpoints"
IGNORE = -100  # label of a token the loss skips


def handle_tokens(tokenizer, size: int) -> list[int] | None:
    """The token of each handle 1..size, or None where one takes several tokens (its first token
    would stand for two handles)."""
    tokens = [tokenizer.encode(str(h), add_special_tokens=False) for h in range(1, size + 1)]
    return [t[0] for t in tokens] if all(len(t) == 1 for t in tokens) else None


def encode(tokenizer, example: dict, objective: str = "page") -> dict[str, list]:
    """Token ids and labels (and, for ``handles_listwise``, each labelled position's candidate handle
    tokens in ``choices`` and where its target stood in retrieval order in ``retrieval_ranks``)."""
    prompt = chat_prompt_ids(tokenizer, example["messages"])
    answer = [*tokenizer.encode(example["completion"], add_special_tokens=False), tokenizer.eos_token_id]
    labels = list(answer)
    choices: list[list[int]] = [[] for _ in answer]
    ranks = []
    if objective != "page":  # only the first handle of each module whose first item was bought next
        led = iter(example.get("first_bought", []))
        sizes = iter(example.get("pool_sizes", []))
        retrieval = iter(example.get("leader_retrieval_rank", []))
        labels = [IGNORE] * len(answer)
        for i in range(1, len(answer)):
            if not tokenizer.decode(answer[:i]).endswith('"items":['):
                continue
            bought, size, rank = next(led, False), next(sizes, 0), next(retrieval, None)
            if not bought:
                continue
            if objective == "handles":
                labels[i] = answer[i]
            elif (options := handle_tokens(tokenizer, size)) and answer[i] in options:
                labels[i], choices[i] = answer[i], options
                ranks.append(rank)
    row = {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + labels}
    if objective == "handles_listwise":
        row.update(choices=[[] for _ in prompt] + choices, retrieval_ranks=ranks)
    return row


class CompletionCollator:
    """Left-pads a batch so every row's completion ends at the last position; the model then only
    computes logits for the last ``logits_to_keep`` positions (the completion plus one), not for the
    ~1,000 prompt tokens: the vocabulary projection of every prompt position was a fifth of the cost
    of a step. ``labels`` come trimmed to those positions."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]):
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        keep = 1 + max(len(r["labels"]) - next(i for i, label in enumerate(r["labels"]) if label != IGNORE)
                       for r in rows)
        padded = [(r, width - len(r["input_ids"])) for r in rows]
        mask = torch.tensor([[0] * n + [1] * len(r["input_ids"]) for r, n in padded])
        batch = {
            "input_ids": torch.tensor([[self.pad_id] * n + r["input_ids"] for r, n in padded]),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": torch.tensor([([IGNORE] * n + r["labels"])[-keep:] for r, n in padded]),
            "logits_to_keep": keep,
        }
        if "choices" in rows[0]:  # [rows, keep, most candidates], -1 where a position has fewer
            widest = max(len(c) for r in rows for c in r["choices"])
            batch["choices"] = torch.tensor([[c + [-1] * (widest - len(c)) for c in ([[]] * n + r["choices"])[-keep:]]
                                             for r, n in padded])
        return batch


def completion_loss(outputs, labels, num_items_in_batch=None):
    """Next-token cross-entropy over the kept positions; summed and divided by the completion tokens
    of the whole accumulated batch when the Trainer gives their count (exact under gradient accumulation)."""
    import torch.nn.functional as F

    logits = outputs.logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (target != IGNORE).sum())


class ListwiseLoss:
    """Cross-entropy over each labelled position's candidate handles only. The trainer hands it the
    batch's ``choices`` (``ChoicesTrainer``); normalised as ``completion_loss``."""

    choices = None

    def __call__(self, outputs, labels, num_items_in_batch=None):
        import torch.nn.functional as F

        logits = outputs.logits[:, :-1].float()
        target = labels[:, 1:].to(logits.device)
        options = self.choices[:, 1:].to(logits.device)
        at = target != IGNORE
        scores = logits[at].gather(1, options[at].clamp(min=0)).masked_fill(options[at] < 0, float("-inf"))
        index = (options[at] == target[at].unsqueeze(1)).int().argmax(1)
        loss = F.cross_entropy(scores, index, reduction="sum")
        return loss / (num_items_in_batch if num_items_in_batch is not None else at.sum())


def handle_ranks(model, rows: list[dict], pad_id: int) -> list[tuple[int, int, int | None]]:
    """Per labelled position of ``rows`` (encoded ``handles_listwise``): (the target's rank among the
    candidates by the model's scores, the number of candidates, its rank in retrieval order)."""
    import torch

    out = []
    collate = CompletionCollator(pad_id)
    model.eval()
    with torch.no_grad():
        for row in rows:
            batch = collate([row])
            choices, labels = batch.pop("choices")[0, 1:], batch.pop("labels")[0, 1:]
            logits = model(**batch).logits[0, :-1]
            at = (labels != IGNORE).nonzero().flatten().tolist()
            for position, retrieval_rank in zip(at, row["retrieval_ranks"], strict=True):
                options = [t for t in choices[position].tolist() if t >= 0]
                scores = logits[position, options]
                target = scores[options.index(int(labels[position]))]
                out.append((1 + int((scores > target).sum()), len(options), retrieval_rank))
    return out


def rank_summary(ranks: list[tuple[int, int, int | None]]) -> dict[str, float]:
    """Mean reciprocal rank and top-1 share of the bought item among each module's candidates: by
    the model, by retrieval order, and by chance (a uniformly random order: H(n) / n)."""
    if not ranks:
        return {}
    n = len(ranks)
    with_retrieval = [r for r in ranks if r[2]]
    return {
        "positions": n,
        "mrr_model": round(sum(1 / r for r, _, _ in ranks) / n, 4),
        "top1_model": round(sum(r == 1 for r, _, _ in ranks) / n, 4),
        "mrr_retrieval": round(sum(1 / q for _, _, q in with_retrieval) / len(with_retrieval), 4)
        if with_retrieval else None,
        "mrr_chance": round(sum(sum(1 / k for k in range(1, size + 1)) / size for _, size, _ in ranks) / n, 4),
    }


def base_model_name(config: FinetuneConfig, settings: Settings) -> str:
    return config.base_model or settings.model


def output_dir(config: FinetuneConfig) -> Path:
    """Where the run saves what it trained: the adapter (lora) or the whole model folder (full)."""
    return Path(config.out) / (MODEL_DIR if config.method == "full" else ADAPTER_DIR)


@dataclass
class Trained:
    model: object  # the peft model (lora) or the plain model (full), as saved
    tokenizer: object
    metadata: dict


def encode_examples(tokenizer, examples: list[dict], config: FinetuneConfig) -> tuple[dict[str, list], int, int]:
    """The training and held-out rows; examples longer than ``max_seq_len`` or with nothing to learn
    are skipped and counted (returned after the rows)."""
    encoded: dict[str, list] = {"train": [], "eval": []}
    too_long = unlabelled = 0
    for example in examples:
        row = encode(tokenizer, example, config.objective)
        if len(row["input_ids"]) > config.train.max_seq_len:
            too_long += 1
            continue
        if all(label == IGNORE for label in row["labels"]):  # nothing to learn: no bought item leads a module
            unlabelled += 1
            continue
        encoded[example["split"]].append(row)
    if not encoded["train"]:
        raise ConfigError(f"train.max_seq_len: no training example fits {config.train.max_seq_len} tokens "
                          f"({too_long} too long, {len(encoded['eval'])} held out)")
    if too_long or unlabelled:
        print(f"skipped {too_long} examples longer than max_seq_len={config.train.max_seq_len}, {unlabelled} "
              f"with nothing to learn for objective {config.objective}")
    return encoded, too_long, unlabelled


def adapter_metadata(config: FinetuneConfig, base: str, manifest: dict, metrics: dict) -> dict:
    """What the adapter was trained from and how (``homepage_adapter.json``); serving checks the
    hashes against its own templates, rules, skeleton and retrieval settings."""
    return {
        "base_model": base, "gguf_file": config.gguf_file, "data": str(config.data),
        "data_hash": manifest["data_hash"], "templates": manifest["templates"],
        "rules_hash": manifest["rules_hash"], "skeleton_hash": manifest["skeleton_hash"],
        "retrieval": manifest["retrieval"], "teacher": manifest["teacher"],
        "method": config.method, "lora": config.lora.model_dump() if config.method == "lora" else None,
        "train": config.train.model_dump(), "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def train(config: FinetuneConfig, settings: Settings, examples: list[dict], manifest: dict,
          restart: bool = False) -> Trained:
    """Train and save ``out/adapter`` (or ``out/model`` for ``method: full``) with its metadata."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    out = Path(config.out)
    base = base_model_name(config, settings)
    tokenizer, net = load_base(base, config.gguf_file, "float32", str(settings.model_cache_dir))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    encoded, too_long, unlabelled = encode_examples(tokenizer, examples, config)

    lora = config.lora
    if config.method == "full":
        model = net
    else:
        model = get_peft_model(net, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    checkpoints = out / CHECKPOINTS_DIR
    identity = hashlib.sha256(json.dumps([examples, lora.model_dump(), base, config.objective, config.method],
                                         sort_keys=True).encode()).hexdigest()
    mark = checkpoints / "examples.sha256"
    if checkpoints.is_dir() and not restart and (not mark.exists() or mark.read_text() != identity):
        print("the examples or LoRA settings changed since the last checkpoint: training from the start")
        restart = True
    if restart:
        shutil.rmtree(checkpoints, ignore_errors=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    mark.write_text(identity)
    last = get_last_checkpoint(str(checkpoints))
    t = config.train
    args = TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        warmup_steps=t.warmup_ratio, lr_scheduler_type="cosine", logging_steps=t.logging_steps,
        save_steps=t.save_steps, save_total_limit=2, bf16=t.bf16, seed=config.seed, data_seed=config.seed,
        report_to="none", remove_unused_columns=False, prediction_loss_only=True, dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    listwise = config.objective == "handles_listwise"
    loss = ListwiseLoss() if listwise else completion_loss

    class ChoicesTrainer(Trainer):
        """Hands each batch's candidate choices to the listwise loss before the model sees the batch."""

        def compute_loss(self, model, inputs, *args, **kwargs):
            if listwise:
                loss.choices = inputs.pop("choices")
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = ChoicesTrainer(model=model, args=args, train_dataset=encoded["train"],
                             eval_dataset=encoded["eval"] or None, data_collator=CompletionCollator(pad),
                             compute_loss_func=loss)
    metrics: dict[str, float | int] = {}
    if encoded["eval"] and last is None:
        metrics["eval_loss_before"] = round(trainer.evaluate()["eval_loss"], 4)
        if listwise:
            metrics["held_out_before"] = rank_summary(handle_ranks(model, encoded["eval"], pad))
    if last:
        print(f"resuming from {last}")
    result = trainer.train(resume_from_checkpoint=last)
    metrics["train_loss"] = round(result.training_loss, 4)
    metrics["steps"] = trainer.state.global_step
    if encoded["eval"]:
        metrics["eval_loss_after"] = round(trainer.evaluate()["eval_loss"], 4)
        if listwise:
            metrics["held_out_after"] = rank_summary(handle_ranks(model, encoded["eval"], pad))
    metrics.update(train_examples=len(encoded["train"]), eval_examples=len(encoded["eval"]), too_long=too_long,
                   unlabelled=unlabelled, objective=config.objective,
                   seconds=round(time.perf_counter() - started, 1), resumed_from=Path(last).name if last else None)
    if "eval_loss_after" in metrics:
        metrics["eval_perplexity_after"] = round(math.exp(metrics["eval_loss_after"]), 3)

    folder = output_dir(config)
    model.save_pretrained(folder)
    metadata = adapter_metadata(config, base, manifest, metrics)
    if config.method == "full":  # a base model itself, served as HOMEPAGE_MODEL (as a merged adapter is)
        tokenizer.save_pretrained(folder)
        metadata["fine_tuned_from"] = metadata.pop("base_model")
    write_metadata(folder, metadata)
    model.eval()
    return Trained(model, tokenizer, metadata)
