"""Streams that run ahead of their consumer: bounded, ordered, exceptions passed on.

Used by the extraction and matching pipelines (``extract.LocalBackend``,
``match.LocalBackend``) to overlap reading, computing and writing.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def ordered_map(fn: Callable[[str], T], items: Sequence[str], pool: Executor,
                depth: int) -> Iterator[T]:
    """``fn(item)`` for every item, in order, with at most ``depth`` calls submitted ahead.

    Memory stays bounded whatever the number of items: at most ``depth`` results exist
    besides the one just yielded. Exceptions of ``fn`` are raised at the item's place.
    Closing the iterator cancels the calls not yet started.
    """
    pending: deque[Future] = deque()
    it = iter(items)
    try:
        for item in islice(it, max(1, depth)):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in islice(it, 1):
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        for future in pending:
            future.cancel()


def run_ahead(items: Iterator[T], depth: int, name: str = "dift-sfm-ahead") -> Iterator[T]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead of the consumer.

    The items are handed over through a bounded queue, in order; an exception of the producer
    is raised in the consumer at its place. Closing the returned iterator (or an exception in
    the consumer) stops the producer at its next item.
    """
    handoff: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(payload: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(payload, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((False, err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = handoff.get()
            if ok:
                yield item  # type: ignore[misc]
            elif item is None:
                return
            else:
                raise item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=10.0)
