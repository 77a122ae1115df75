"""Leave-last-out splits: per user, the last basket is the test target, the one before it the
validation target, the rest is history.

Events are ordered by timestamp where the user's events all have one, else by ``seq_pos``. A basket
is the run of events that share one time (or one position): they are held out together, since
nothing says which of them came first. A model evaluated on a split may be fitted on
``Split.train`` only: for ``test`` that is history + validation basket, for ``valid`` history alone.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby
from typing import Literal

from retrieval.records import Event

Part = Literal["valid", "test"]


def _when(event: Event, by_time: bool) -> float:
    if by_time:
        return float(event.timestamp)  # type: ignore[arg-type]
    return float(event.seq_pos if event.seq_pos is not None else 0)


def baskets(events: Iterable[Event]) -> list[list[Event]]:
    """One user's events as baskets, oldest first."""
    events = list(events)
    by_time = bool(events) and all(e.timestamp is not None for e in events)
    ordered = sorted(events, key=lambda e: (_when(e, by_time), e.seq_pos if e.seq_pos is not None else 0))
    return [list(group) for _, group in groupby(ordered, key=lambda e: _when(e, by_time))]


@dataclass(frozen=True)
class Split:
    part: Part
    train: list[Event]  # everything a model may be fitted on, every user's events oldest first
    targets: dict[str, list[str]]  # user -> held-out item ids (the basket), for users with a target
    history: dict[str, list[str]]  # user -> item ids the ranking may see (= that user's train events)
    protocol: str = "ours"  # "li": users split 72/8/20 (``user_split``), NDCG over the whole basket


def leave_last_out(events: Iterable[Event], part: Part = "test") -> Split:
    """Hold out the last basket (``test``) or the second to last (``valid``, the last one dropped
    entirely). A user needs a history basket before the target; too short a user is all training
    (for ``valid``, without any test basket), and has no target."""
    def cut(user: str, user_baskets: list[list[Event]]) -> tuple[list[list[Event]], list[Event] | None]:
        if part == "valid" and len(user_baskets) >= 2:
            user_baskets = user_baskets[:-1]  # the test basket is never seen while validating
        return (user_baskets[:-1], user_baskets[-1]) if len(user_baskets) >= 2 else (user_baskets, None)

    return _split(events, part, cut, "ours")


def user_split(events: Iterable[Event], part: Part = "test", seed: int = 0,
               shares: tuple[float, float] = (0.72, 0.08)) -> Split:
    """Li et al.'s protocol (TOIS 2023): users, in a seeded random order, are 72 % training users
    (every basket trains), 8 % validation and 20 % test users; a validation or test user's last
    basket is the target, the baskets before it the history. ``valid`` holds out the validation
    users' last baskets and never shows a test user's; ``test`` holds out the test users' and trains
    on every validation basket."""
    events = list(events)
    users = sorted({e.user_id for e in events})
    random.Random(seed).shuffle(users)
    n_train, n_valid = int(len(users) * shares[0]), int(len(users) * (shares[0] + shares[1]))
    role = {u: "train" if n < n_train else "valid" if n < n_valid else "test" for n, u in enumerate(users)}

    def cut(user: str, user_baskets: list[list[Event]]) -> tuple[list[list[Event]], list[Event] | None]:
        if len(user_baskets) < 2 or role[user] == "train" or (role[user], part) == ("valid", "test"):
            return user_baskets, None
        return user_baskets[:-1], (user_baskets[-1] if role[user] == part else None)

    return _split(events, part, cut, "li")


def _split(events: Iterable[Event], part: Part, cut, protocol: str) -> Split:
    """Each user's baskets cut by ``cut`` into what trains and the held-out target (None: none)."""
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_user[e.user_id].append(e)
    train: list[Event] = []
    targets: dict[str, list[str]] = {}
    history: dict[str, list[str]] = {}
    for user in sorted(by_user):
        kept, target = cut(user, baskets(by_user[user]))
        if target is not None:
            targets[user] = list(dict.fromkeys(e.item_id for e in target))
        seen = [e for basket in kept for e in basket]
        train.extend(seen)
        history[user] = [e.item_id for e in seen]
    return Split(part, train, targets, history, protocol)
