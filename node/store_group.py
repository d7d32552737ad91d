"""Group commit: many threads' small store writes run as one transaction, each caller answered alone.

The receiver indexes every C-STORE from its association's thread; 16 associations each running
their own ``BEGIN IMMEDIATE ... COMMIT`` queue on the store's write lock one by one, each hand-off
a thread switch (bench/README.md, soak).  Here a caller joins a queue instead: the first one
becomes the leader and runs everything queued at that moment as one batch (its own item among
them); callers arriving meanwhile queue for the next batch, whose first caller the leader wakes to
lead it.  Nobody waits for a batch to fill (a lone caller is a batch of one at once), and every
caller returns only when its own item's batch has committed, with its own result or exception.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Generic, Sequence, TypeVar

__all__ = ["GroupCommit"]

log = logging.getLogger("node.store")

T = TypeVar("T")
R = TypeVar("R")


class _Waiter(Generic[T, R]):
    __slots__ = ("item", "wake", "lead", "done", "result", "error")

    def __init__(self, item: T) -> None:
        self.item = item
        self.wake = threading.Event()
        self.lead = False  # woken to lead the next batch (set under the group's lock)
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Runs ``run_batch(items)`` for the items of concurrent :meth:`submit` calls, one batch at a time.

    Args:
        run_batch: does all items in one transaction; returns one result or exception per item, in
            order (an item's own failure must not fail the others).  If it raises instead (the
            transaction as a whole failed: nothing of it was committed), each item of a batch of
            several is run alone with ``run_one``, so only the items that fail alone fail.
        run_one: one item in its own transaction; returns its result or raises.
        max_batch: at most this many items per batch (the rest wait for the next one).
    """

    def __init__(self, run_batch: Callable[[Sequence[T]], Sequence[R | Exception]], run_one: Callable[[T], R],
                 *, max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run_batch = run_batch
        self._run_one = run_one
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: deque[_Waiter[T, R]] = deque()
        self._busy = False  # a leader is running a batch (or has been woken to)
        #: batches run and items done since creation (for tests and benchmarks)
        self.batches = 0
        self.items = 0

    def pending(self) -> int:
        """Items waiting for a batch (not counting the one being run)."""
        with self._lock:
            return len(self._queue)

    def submit(self, item: T) -> R:
        """Do ``item`` in the next batch; returns its result once that batch committed, or raises its error."""
        w: _Waiter[T, R] = _Waiter(item)
        with self._lock:
            self._queue.append(w)
            if not self._busy:
                self._busy = w.lead = True
        if not w.lead:
            w.wake.wait()
        if not w.done:  # leading: this item is the first queued, so it is in the batch taken
            self._lead()
        if w.error is not None:
            raise w.error
        return w.result  # type: ignore[return-value]  # done without error: run_batch/run_one gave an R

    def _lead(self) -> None:
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
        try:
            self._run(batch)
        finally:
            with self._lock:
                self.batches += 1
                self.items += len(batch)
                nxt = self._queue[0] if self._queue else None
                if nxt is None:
                    self._busy = False
                else:
                    nxt.lead = True
            for w in batch:
                if not w.done:  # the leader was interrupted (BaseException): the others must not hang
                    w.error, w.done = RuntimeError("the batch was interrupted before this item was done"), True
            if nxt is not None:  # the next batch first: its transaction can start while these answer
                nxt.wake.set()
            for w in batch:
                w.wake.set()

    def _run(self, batch: list[_Waiter[T, R]]) -> None:
        items = [w.item for w in batch]
        results: list[R | BaseException]
        try:
            results = list(self._run_batch(items))
            if len(results) != len(items):
                raise RuntimeError(f"group commit: {len(results)} results for {len(items)} items")
        except Exception as exc:  # noqa: BLE001 - the batch as a whole failed: each item alone below
            if len(items) == 1:
                results = [exc]
            else:
                log.warning("group commit of %d items failed (%s: %s); each is done alone", len(items),
                            type(exc).__name__, exc)
                results = []
                for item in items:
                    try:
                        results.append(self._run_one(item))
                    except Exception as one:  # noqa: BLE001 - handed to this item's caller
                        results.append(one)
        for w, r in zip(batch, results):
            if isinstance(r, BaseException):
                w.error = r
            else:
                w.result = r
            w.done = True
