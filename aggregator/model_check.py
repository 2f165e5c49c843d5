"""The last line before a new global model is published: finite weights and finite outputs.

The update bounds (:mod:`aggregator.update_bounds`) keep poisoned updates out of the sum; this
is what holds if something gets past them (the norm bound turned off, rounding at the edge of
fp32): a global model with a non-finite weight, or whose outputs are not finite, would make
every agent's training diverge. Such a round is *discarded*: its updates were counted (their
receipts said so), its result is not published; the global model stays as it was, and the
next round starts from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from aggregator.strategy import AggregationError, RoundSum

log = logging.getLogger("fedmq.aggregator")

Tensors = dict[str, np.ndarray]
Probe = Callable[[Mapping[str, np.ndarray]], "str | None"]


def next_global_model(
    acc: RoundSum, params: Mapping[str, np.ndarray], probe: Probe, round_id: int
) -> tuple[Tensors | None, str]:
    """The round's new global model, or None and why it must not be published.

    ``acc.apply`` computes the round's aggregated delta (its rule's) and the server
    optimizer's step from ``params``. The intake's headroom check assumed a convex
    combination, which a server learning rate above 1, momentum or an adaptive step is not:
    the step's own finiteness check (AggregationError) and ``probe`` cover them.

    ``probe`` says why a model is unusable (None: it is fine), e.g. non-finite outputs on a
    held-out batch. Capped weights and a discarded round are logged here, once per round.
    """
    for client, n, weight in acc.capped():
        log.warning(
            "round %d: weight of %s capped from %d to %.0f samples (max share %.2g)",
            round_id,
            client,
            n,
            weight,
            acc.max_share,
        )
    try:
        target = acc.apply(params)
    except AggregationError as exc:
        unusable = str(exc)
    else:
        unusable = probe(target) or ""
        if not unusable:
            return target, ""
    why = f"result not usable ({unusable}): the global model is unchanged"
    log.error("round %d discarded: %s", round_id, why)
    return None, why
