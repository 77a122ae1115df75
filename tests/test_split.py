import pytest

from retrieval import Event
from retrieval.split import baskets, leave_last_out

pytestmark = pytest.mark.one_engine


def _seq(user: str, items: list[str]) -> list[Event]:
    return [Event(user, item, seq_pos=pos, event_type="review") for pos, item in enumerate(items)]


def test_leave_last_out_by_position():
    events = _seq("u", ["a", "b", "c", "d", "e"])[::-1]  # file order must not matter
    test, valid = leave_last_out(events, "test"), leave_last_out(events, "valid")
    assert test.targets == {"u": ["e"]} and test.history == {"u": ["a", "b", "c", "d"]}
    assert valid.targets == {"u": ["d"]} and valid.history == {"u": ["a", "b", "c"]}
    assert [e.item_id for e in test.train] == ["a", "b", "c", "d"]
    assert [e.item_id for e in valid.train] == ["a", "b", "c"]


def test_timestamps_win_over_positions_and_a_basket_is_held_out_whole():
    events = [
        Event("u", "x", timestamp=100.0, seq_pos=3), Event("u", "y", timestamp=200.0, seq_pos=0),
        Event("u", "z1", timestamp=300.0, seq_pos=1), Event("u", "z2", timestamp=300.0, seq_pos=2),
        Event("u", "w1", timestamp=400.0, seq_pos=9), Event("u", "w2", timestamp=400.0, seq_pos=8),
    ]
    assert [[e.item_id for e in b] for b in baskets(events)] == [["x"], ["y"], ["z1", "z2"], ["w2", "w1"]]
    test, valid = leave_last_out(events, "test"), leave_last_out(events, "valid")
    assert sorted(test.targets["u"]) == ["w1", "w2"]
    assert test.history["u"] == ["x", "y", "z1", "z2"]
    assert valid.targets["u"] == ["z1", "z2"] and valid.history["u"] == ["x", "y"]


def test_short_users_have_no_target_and_never_leak_the_test_item():
    events = [*_seq("one", ["a"]), *_seq("two", ["a", "b"])]
    test, valid = leave_last_out(events, "test"), leave_last_out(events, "valid")
    assert test.targets == {"two": ["b"]} and test.history == {"one": ["a"], "two": ["a"]}
    assert valid.targets == {} and valid.history == {"one": ["a"], "two": ["a"]}


@pytest.mark.parametrize("seed", [0, 1])
def test_no_target_reaches_the_training_part(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    events = []
    for u in range(300):
        n = int(rng.integers(1, 12))
        times = np.sort(rng.integers(0, 6, size=n)) if u % 2 else None  # half the users have baskets
        for pos in range(n):
            item = f"i{rng.integers(0, 50)}"
            events.append(Event(f"u{u}", item, timestamp=None if times is None else float(times[pos]), seq_pos=pos))
    test, valid = leave_last_out(events, "test"), leave_last_out(events, "valid")
    for user, user_events in _by_user(events).items():
        user_baskets = baskets(user_events)
        if user in test.targets:
            held = set(user_baskets[-1])
            assert held.isdisjoint(test.train) and {e.item_id for e in held} == set(test.targets[user])
        if user in valid.targets:
            held = set(user_baskets[-1]) | set(user_baskets[-2])
            assert held.isdisjoint(valid.train) and {e.item_id for e in user_baskets[-2]} == set(valid.targets[user])
    # what the ranking may see is exactly the training part
    for split in (test, valid):
        assert sum(len(h) for h in split.history.values()) == len(split.train)


def _by_user(events):
    out = {}
    for e in events:
        out.setdefault(e.user_id, []).append(e)
    return out
