"""The observer interface through which the core reports what only it can time (decoding, model calls, database
failures, Redis cache commands) to whoever collects metrics, without importing the API layer.

``app/api/metrics.py``'s ``Metrics`` implements it for ``GET /metrics``; :data:`NULL_OBSERVER` does nothing (the
default for the CLIs and tests that build a service without an app).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Observer(Protocol):
    """Receives measurements; every method must be cheap, thread-safe and must not raise."""

    def observe_decode(self, seconds: float) -> None:
        """One image decoded (and fitted to the model's input), in ``seconds`` of wall time."""

    def observe_embed(self, batch_size: int, seconds: float) -> None:
        """One model call over ``batch_size`` images, in ``seconds`` of wall time."""

    def count_database_error(self, operation: str) -> None:
        """One failed database operation (``operation``: a short fixed name such as ``search`` or ``write``)."""

    def observe_cache_redis(self, operation: str, seconds: float, failed: bool) -> None:
        """One command of the Redis cache layer (``operation``: ``get``, ``set`` or ``ping``) that took ``seconds``
        of wall time and failed or not."""


class NullObserver:
    """An :class:`Observer` that discards everything."""

    def observe_decode(self, seconds: float) -> None:
        pass

    def observe_embed(self, batch_size: int, seconds: float) -> None:
        pass

    def count_database_error(self, operation: str) -> None:
        pass

    def observe_cache_redis(self, operation: str, seconds: float, failed: bool) -> None:
        pass


NULL_OBSERVER: Observer = NullObserver()


def timed_embed(embed_fn: Callable[[Sequence[Any]], Any], observer: Observer) -> Callable[[Sequence[Any]], Any]:
    """``embed_fn`` (images -> embeddings) reporting each non-empty call's batch size and wall time to
    ``observer.observe_embed``; give the result to the dynamic batcher instead of ``embed_fn``."""

    def timed(images: Sequence[Any]) -> Any:
        start = time.perf_counter()
        result = embed_fn(images)
        if images:
            observer.observe_embed(len(images), time.perf_counter() - start)
        return result

    return timed
