"""The model worker: one thread owns the model, and concurrent page requests queue for it.

Requests that arrive together are composed together (``Composer.compose_batch``: one forward
pass per step for all of them). Each request's time budget runs from its arrival, so time spent
in the queue counts; a request whose remaining budget is shorter than the model's recent time for
a page is answered with the deterministic page, marked, without asking the model (its time goes to
a request it can still serve). A full queue is answered the same way by
the caller (``submit`` returns None): load never turns into an error.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from agent.composer import Composer
from agent.schema import Homepage

QUEUE_BUDGET_SPENT = "the page's time budget would run out before the model could finish it"


@dataclass
class PageRequest:
    user_id: str
    deadline: float | None  # time.monotonic() by which the page is due
    future: Future = field(default_factory=Future)


class ModelWorker:
    def __init__(self, composer: Callable[[], Composer], batch: int = 4, queue_max: int = 32,
                 batch_wait_s: float = 0.005):
        self._composer = composer  # called per batch: a reload swaps the composer between batches
        self.batch, self.batch_wait_s = batch, batch_wait_s
        self._queue: queue.Queue[PageRequest] = queue.Queue(maxsize=queue_max)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seconds: dict[int, float] = {}  # batch size -> moving average of its time
        self._busy_since: float | None = None  # when the batch in hand was taken
        self._in_hand_s = 0.0  # how long it is expected to take

    def start(self) -> ModelWorker:
        """Start the thread (again after ``stop``; a running worker is left as it is)."""
        if not self.alive:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True, name="model-worker")
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, then stop; requests still queued are answered by their
        callers' own deadline (the deterministic page)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, user_id: str, deadline: float | None) -> Future | None:
        """The page's future, or None when the queue is full or the work ahead of this request
        would outlast its budget (the caller answers deterministically, at once)."""
        waiting = self.depth + 1
        if deadline is not None and (waiting > 1 or self._busy_since is not None):
            in_hand = 0.0 if self._busy_since is None else max(
                self._in_hand_s - (time.monotonic() - self._busy_since), 0.0)
            batches = -(-waiting // self.batch)
            if time.monotonic() + in_hand + batches * self.expected_s(min(waiting, self.batch)) > deadline:
                return None
        request = PageRequest(user_id, deadline)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            return None
        return request.future

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch, until = [first], time.monotonic() + self.batch_wait_s
            while len(batch) < self.batch:
                try:
                    batch.append(self._queue.get(timeout=max(until - time.monotonic(), 0.0)))
                except queue.Empty:
                    break
            self._busy_since = time.monotonic()
            try:
                self._serve(batch)
            finally:
                self._busy_since = None

    def expected_s(self, size: int) -> float:
        """How long a batch of ``size`` pages takes: its moving average, or for a size not tried
        yet the slowest smaller size's (optimistic, so that a larger batch gets tried and learnt;
        0 before any batch: nothing is turned away on a guess)."""
        if size in self._seconds:
            return self._seconds[size]
        return max((t for n, t in self._seconds.items() if n < size), default=0.0)

    def _admit(self, live: list[PageRequest]) -> tuple[list[PageRequest], list[PageRequest]]:
        """The largest batch, most time left first, that can be composed before its members are
        due; and the rest. A lone request is tried anyway when nothing else waits (the model is
        idle, and its time is learnt again)."""
        now = time.monotonic()

        def left(r: PageRequest) -> float:
            return math.inf if r.deadline is None else r.deadline - now

        ranked = sorted(live, key=left, reverse=True)
        for k in range(len(ranked), 0, -1):
            if left(ranked[k - 1]) > self.expected_s(k):
                return ranked[:k], ranked[k:]
        if len(ranked) == 1 and self._queue.empty():
            return ranked, []
        return [], ranked

    def _serve(self, batch: list[PageRequest]) -> None:
        composer = self._composer()
        # a caller that gave up has cancelled its future; a request that cannot be composed in time
        # gets the deterministic page now, and the model's time goes to those that can
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        due, late = self._admit(live)
        for r in late:
            _settle(r.future, lambda r=r: composer.fallback(r.user_id, QUEUE_BUDGET_SPENT))
        if not due:
            return
        self._in_hand_s = self.expected_s(len(due))
        started = time.monotonic()
        if len(due) == 1:
            _settle(due[0].future, lambda: composer.compose(due[0].user_id, deadline=due[0].deadline))
            pages = [] if due[0].future.exception() else [due[0].future.result()]
        else:
            deadlines = [r.deadline for r in due if r.deadline is not None]
            pages = _attempt(lambda: composer.compose_batch([r.user_id for r in due], len(due),
                                                            min(deadlines) if deadlines else None))
            for i, r in enumerate(due):
                if isinstance(pages, BaseException):  # an id or catalogue problem: each request on its own
                    _settle(r.future, lambda r=r: composer.compose(r.user_id, deadline=r.deadline))
                else:
                    r.future.set_result(pages[i])
        if isinstance(pages, list) and pages and all(p.meta.path != "fallback" and not p.meta.cached for p in pages):
            self._record(len(due), time.monotonic() - started)  # a batch cut short says little of its time

    def _record(self, size: int, seconds: float) -> None:
        old = self._seconds.get(size)
        self._seconds[size] = seconds if old is None else 0.8 * old + 0.2 * seconds


def _attempt(call: Callable[[], list[Homepage]]) -> list[Homepage] | BaseException:
    try:
        return call()
    except Exception as exc:
        return exc


def _settle(future: Future, call: Callable[[], Homepage]) -> None:
    try:
        future.set_result(call())
    except Exception as exc:  # InputError or PageUnavailable: the caller's to report
        future.set_exception(exc)
