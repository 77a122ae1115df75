"""A small SASRec-style sequential recommender: a causal transformer over a user's item sequence,
trained with a full softmax over all items (no sampled negatives), on a CPU.

The item embedding table is tied to the output layer, so a user's score for an item is the dot
product of the sequence encoding with the item's vector. Those vectors go into the vector store as
their own collection; serving encodes the sequence and does one inner-product search.

Artefacts (``<store>/sasrec/``): ``model.pt`` (weights), ``items.json`` (index -> item id),
``config.json`` (the ``SASRecConfig`` and training facts).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

MODEL_DIR = "sasrec"


@dataclass
class SASRecConfig:
    hidden: int = field(default=64, metadata={"help": "embedding and model width"})
    blocks: int = field(default=2, metadata={"help": "transformer blocks"})
    heads: int = field(default=2, metadata={"help": "attention heads"})
    max_len: int = field(default=50, metadata={"help": "most recent items the model reads"})
    dropout: float = field(default=0.3, metadata={"help": "dropout on embeddings, attention and FFN"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=128, metadata={"help": "sequences per step"})
    epochs: int = field(default=200, metadata={"help": "upper bound; early stopping usually ends sooner"})
    patience: int = field(default=2, metadata={"help": "evaluations without a better validation NDCG@10"})
    eval_every: int = field(default=2, metadata={"help": "epochs between validation evaluations"})
    max_minutes: float = field(default=15.0, metadata={"help": "wall-clock cap on training"})
    seed: int = 0
    threads: int = field(default=2, metadata={"help": "torch CPU threads (1 is faster on a shared, busy CPU)"})


class _Block(nn.Module):
    """Pre-norm causal self-attention + feed-forward."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(att.transpose(1, 2).reshape(b, n, h)))
        return x + self.drop(self.ffn(self.norm2(x)))


class SASRec(nn.Module):
    """Index 0 is padding; items are 1..n_items. Sequences are left-padded; positions are counted
    from the newest item, so a batch may be padded to any length."""

    def __init__(self, n_items: int, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.items = nn.Embedding(n_items + 1, config.hidden, padding_idx=0)
        self.positions = nn.Embedding(config.max_len, config.hidden)
        self.blocks = nn.ModuleList(_Block(config.hidden, config.heads, config.dropout) for _ in range(config.blocks))
        self.norm = nn.LayerNorm(config.hidden)
        self.drop = nn.Dropout(config.dropout)
        nn.init.normal_(self.items.weight, std=config.hidden**-0.5)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def hidden_states(self, seqs: torch.Tensor) -> torch.Tensor:
        n = seqs.shape[1]
        real = seqs > 0
        x = self.items(seqs) * math.sqrt(self.config.hidden)
        x = x + self.positions(torch.arange(n - 1, -1, -1, device=seqs.device))
        x = self.drop(x) * real.unsqueeze(-1)
        # causal, and no attention to padding; every position may see itself so no row is empty
        causal = torch.ones(n, n, dtype=torch.bool, device=seqs.device).tril()
        mask = (causal & real.unsqueeze(1)) | torch.eye(n, dtype=torch.bool, device=seqs.device)
        mask = mask.unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask) * real.unsqueeze(-1)
        return self.norm(x)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        """The user vector: the state at the newest position."""
        return self.hidden_states(seqs)[:, -1]

    def item_vectors(self) -> torch.Tensor:
        """Row i is item i+1's vector (padding left out)."""
        return self.items.weight[1:]


def pad_left(seqs: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    n = max(min(max((len(s) for s in seqs), default=1), max_len), 1)
    out = np.zeros((len(seqs), n), dtype=np.int64)
    for row, s in enumerate(seqs):
        tail = list(s)[-max_len:]
        if tail:
            out[row, n - len(tail):] = tail
    return torch.from_numpy(out)


@dataclass
class Trained:
    model: SASRec
    item_ids: list[str]  # index i+1 <-> item_ids[i]
    facts: dict
    _index: dict[str, int] | None = None

    @property
    def index(self) -> dict[str, int]:
        return {item: i + 1 for i, item in enumerate(self.item_ids)}

    @torch.no_grad()
    def encode(self, histories: Sequence[Sequence[str]], batch_size: int = 512) -> np.ndarray:
        """Sequence encodings for item-id histories (oldest first); unknown items are skipped."""
        self.model.eval()
        index = self._index or self.index
        self._index = index
        out = []
        # torch's thread count is process-wide: it is never changed per request (other threads'
        # work, the LLM's above all, would change speed under them)
        for start in range(0, len(histories), batch_size):
            chunk = [[index[i] for i in h if i in index] for h in histories[start:start + batch_size]]
            out.append(self.model.encode(pad_left(chunk, self.model.config.max_len)).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden), dtype=np.float32)

    @torch.no_grad()
    def vectors(self) -> np.ndarray:
        return self.model.item_vectors().numpy().copy()

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), folder / "model.pt")
        (folder / "items.json").write_text(json.dumps(self.item_ids))
        (folder / "config.json").write_text(json.dumps({"config": asdict(self.model.config), **self.facts}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Trained:
        folder = Path(folder)
        if not (folder / "model.pt").exists():
            raise FileNotFoundError(f"{folder}: no trained SASRec model (run `homepage train sasrec`)")
        meta = json.loads((folder / "config.json").read_text())
        item_ids = json.loads((folder / "items.json").read_text())
        model = SASRec(len(item_ids), SASRecConfig(**meta.pop("config")))
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        model.eval()
        return cls(model, item_ids, meta)


def _batches(seqs: list[list[int]], batch_size: int, max_len: int, rng: np.random.Generator):
    """Inputs and next-item targets; sequences are bucketed by length so padding stays small."""
    order = rng.permutation(len(seqs))
    # sort within chunks of 50 batches: random batches, little padding
    chunk = batch_size * 50
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(seqs[i]))
        batches = [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
        for b in rng.permutation(len(batches)):
            rows = [seqs[i][-(max_len + 1):] for i in batches[b]]
            yield pad_left([r[:-1] for r in rows], max_len), pad_left([r[1:] for r in rows], max_len)


def _epoch(model: SASRec, optimiser, seqs: list[list[int]], config: SASRecConfig, rng) -> tuple[float, int]:
    """One pass; returns (summed loss, predicted positions)."""
    model.train()
    total, count = 0.0, 0
    for inputs, targets in _batches(seqs, config.batch_size, config.max_len, rng):
        real = targets > 0
        # full softmax over all items, only where a next item exists; padding is never a class
        logits = model.hidden_states(inputs)[real] @ model.item_vectors().T
        loss = F.cross_entropy(logits, targets[real] - 1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total, count = total + loss.item() * int(real.sum()), count + int(real.sum())
    return total, count


def train_sasrec(
    sequences: dict[str, list[str]],
    item_ids: Sequence[str],
    config: SASRecConfig | None = None,
    validate: Callable[[Trained], float] | None = None,
    epochs: int | None = None,
    progress: bool = True,
) -> Trained:
    """Fit on users' item sequences (oldest first). With ``validate`` (returns NDCG@10 on held-out
    targets), training stops early and the best evaluated weights are kept; without it, exactly
    ``epochs`` (default ``config.epochs``) epochs run."""
    config = config or SASRecConfig()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    item_ids = list(item_ids)
    index = {item: i + 1 for i, item in enumerate(item_ids)}
    seqs = [[index[i] for i in s if i in index] for s in sequences.values()]
    seqs = [s for s in seqs if len(s) >= 2]
    model = SASRec(len(item_ids), config)
    trained = Trained(model, item_ids, {})
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n_epochs = epochs or config.epochs
    best, best_state, best_epoch, waited, history = -1.0, None, 0, 0, []
    started = time.perf_counter()
    bar = tqdm(range(1, n_epochs + 1), desc="sasrec", unit="epoch", disable=not progress)
    for epoch in bar:
        total, count = _epoch(model, optimiser, seqs, config, rng)
        minutes = (time.perf_counter() - started) / 60
        entry = {"epoch": epoch, "loss": round(total / max(count, 1), 4), "minutes": round(minutes, 2)}
        out_of_time = minutes >= config.max_minutes
        if validate is not None and (epoch % config.eval_every == 0 or epoch == n_epochs or out_of_time):
            score = validate(trained)
            entry["val_ndcg@10"] = round(score, 5)
            if score > best:
                best, best_epoch, waited = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
        history.append(entry)
        bar.set_postfix({k: v for k, v in entry.items() if k != "epoch"})
        if (validate is not None and waited >= config.patience) or out_of_time:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    trained.facts = {
        "epochs_run": len(history), "best_epoch": best_epoch or len(history),
        "best_val_ndcg@10": best if best >= 0 else None,
        "train_seconds": round(time.perf_counter() - started, 1), "sequences": len(seqs), "log": history,
    }
    return trained


def holdout_ndcg(trained: Trained, histories: Sequence[Sequence[str]], targets: Sequence[str], k: int = 10) -> float:
    """Mean NDCG@k of exact full-catalogue scores, each user's own history items excluded."""
    index = trained.index
    table = trained.vectors()
    total = 0.0
    for start in range(0, len(histories), 1024):
        chunk, goals = histories[start:start + 1024], targets[start:start + 1024]
        scores = trained.encode(chunk) @ table.T
        for row, (history, target) in enumerate(zip(chunk, goals, strict=True)):
            if target not in index:
                continue
            s = scores[row]
            s[[index[i] - 1 for i in history if i in index]] = -np.inf
            rank = int((s > s[index[target] - 1]).sum())
            total += 1.0 / math.log2(rank + 2) if rank < k else 0.0
    return total / max(len(histories), 1)


@dataclass
class Fitted:
    holdout: Trained  # trained without each user's last item (early-stopped on it)
    final: Trained  # the holdout model trained on, a few epochs, with the last items included


def fit(
    sequences: dict[str, list[str]], item_ids: Sequence[str], config: SASRecConfig | None = None,
    refit_epochs: int = 1, max_validation_users: int = 2000, progress: bool = True,
    holdout: tuple[dict[str, list[str]], dict[str, list[str]]] | None = None,
) -> Fitted:
    """Early-stop on held-out items (NDCG@10, a seeded sample of users), then continue the best
    model on the full sequences so the newest transitions are learned too.

    ``holdout``: (what the early-stopping model may see per user, each validation user's held-out
    items) — on basket data the validation split's history and baskets (``leave_last_out(...,
    "valid")``), so no item of a validation basket reaches the model the validation reads. Default:
    each user's last item held out (sequences of one item per step), users under 3 items kept whole."""
    config = config or SASRecConfig()
    if holdout is None:
        shortened = {u: (s[:-1] if len(s) >= 3 else s) for u, s in sequences.items()}
        targets = {u: [s[-1]] for u, s in sequences.items() if len(s) >= 3}
    else:
        shortened, targets = holdout
    users = sorted(u for u in targets if targets[u] and shortened.get(u))
    rng = np.random.default_rng(config.seed)
    sample = sorted(rng.choice(len(users), min(max_validation_users, len(users)), replace=False))
    val_histories = [shortened[users[i]] for i in sample]
    val_targets = [targets[users[i]][0] for i in sample]  # a basket's first item: the stopping signal
    holdout = train_sasrec(shortened, item_ids, config,
                           validate=lambda t: holdout_ndcg(t, val_histories, val_targets), progress=progress)
    started = time.perf_counter()
    final = Trained(SASRec(len(holdout.item_ids), config), holdout.item_ids, {})
    final.model.load_state_dict(holdout.model.state_dict())
    if refit_epochs:
        _continue(final.model, sequences, holdout.index, config, refit_epochs, progress)
    final.facts = {**holdout.facts, "refit_epochs": refit_epochs,
                   "train_seconds": round(holdout.facts["train_seconds"] + time.perf_counter() - started, 1)}
    return Fitted(holdout, final)


def _continue(model: SASRec, sequences: dict[str, list[str]], index: dict[str, int], config: SASRecConfig,
              epochs: int, progress: bool) -> None:
    torch.manual_seed(config.seed + 1)
    rng = np.random.default_rng(config.seed + 1)
    seqs = [s for s in ([index[i] for i in seq if i in index] for seq in sequences.values()) if len(s) >= 2]
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in tqdm(range(epochs), desc="sasrec refit", unit="epoch", disable=not progress):
        _epoch(model, optimiser, seqs, config, rng)
    model.eval()


def publish(trained: Trained, index, collection: str = "item_vectors") -> None:
    """The learned item table into the vector store (``index`` is a ``retrieval.vectors.VectorIndex``)."""
    index.put_vectors(collection, trained.item_ids, trained.vectors(),
                      metadata={"model": "sasrec", "hidden": trained.model.config.hidden})


def train_for_store(catalog, index, store_dir: Path, config: SASRecConfig | None = None, refit_epochs: int = 1,
                    progress: bool = True) -> Trained:
    """Train on every user's events in the store (early stopping on each user's last item), save the
    model under ``<store>/sasrec`` and publish its item vectors; the ``sasrec`` source serves it."""
    sequences: dict[str, list[str]] = {}
    for e in catalog.all_events():  # ordered by user, then time
        sequences.setdefault(e.user_id, []).append(e.item_id)
    fitted = fit(sequences, sorted(catalog.products), config, refit_epochs, progress=progress)
    fitted.final.save(Path(store_dir) / MODEL_DIR)
    publish(fitted.final, index)
    return fitted.final
