"""One bad request fails only itself: a batch that fails is re-run one request at a time.

Requests are checked at the door (`aptp.runtime.tokenize.check_text`, the pipeline's option
checks), but a batch can still fail for a reason that belongs to one of its requests (an input
no check foresaw, a prompt the tokenizer chokes on). Serving batches several clients' requests
into one call, so without this a single client could fail every request routed beside it. The
re-run costs one call per request, and only when a batch has failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["run_isolated"]

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


def run_isolated(run: Callable[[Sequence[Item]], Sequence[Any]], items: Sequence[Item],
                 what: str = "batch") -> list[Any]:
    """``run(items)``'s results, one per item; where that call fails and holds several items,
    each item is run alone. A failed item's entry is its exception (never raised).

    `run` must return one result per item it is given; another count is a failure of that call.
    """
    try:
        return _checked(run, items)
    except Exception as err:  # noqa: BLE001 - isolated below; each item keeps its own outcome
        if len(items) == 1:
            return [err]
        logger.warning("%s of %d failed (%s): running each request alone", what, len(items), err)
    results: list[Any] = []
    for item in items:
        try:
            results.extend(_checked(run, [item]))
        except Exception as err:  # noqa: BLE001 - this item fails, the others go on
            results.append(err)
    return results


def _checked(run: Callable[[Sequence[Item]], Sequence[Any]], items: Sequence[Item]) -> list[Any]:
    results = list(run(items))
    if len(results) != len(items):  # never leave a request unanswered: its client would wait forever
        raise RuntimeError(f"the pipeline returned {len(results)} results for a batch of {len(items)}")
    return results
