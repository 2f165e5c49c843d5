"""How a restarted aggregator continues: its checkpoint's model and its journaled round.

:func:`restore` runs once, before the service's first round, when it has a state directory
(:class:`~aggregator.resume.Durability`): it loads the last checkpoint into the service,
continues the run it belongs to, and re-opens (and replays) the round after it if that was
announced. It sees the service through :class:`Restorable`, so this module imports no service.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from aggregator.checkpoint import CheckpointError
from aggregator.resume import resolve_run, set_rng_state
from aggregator.roster import AgentRoster
from aggregator.round_records import OpenRound
from aggregator.rounds import RoundState
from shared.protocol.frames import read_header

if TYPE_CHECKING:
    import numpy as np

    from aggregator.async_rounds import AsyncSettings
    from aggregator.config import AggregatorConfig
    from aggregator.downloads import GlobalDownloads
    from aggregator.evaluation import Evaluator
    from aggregator.intake import UpdateIntake
    from aggregator.metrics_log import MetricsLog
    from aggregator.onnx_export import RoundExporter
    from aggregator.resume import Durability
    from aggregator.round_strategy import RoundStrategy
    from aggregator.windows import VersionWindows
    from shared.clock import Clock

log = logging.getLogger("fedmq.aggregator")


class Restorable(Protocol):
    """What a restart reads and sets of the service (the aggregator service's own)."""

    cfg: AggregatorConfig
    clock: Clock
    durable: Durability | None
    run_epoch: int
    downloads: GlobalDownloads
    exporter: RoundExporter
    evaluator: Evaluator
    shapes: dict[str, tuple[int, ...]]
    params: dict[str, np.ndarray]
    model_hash: str
    round_id: int
    strategy: RoundStrategy
    rng: np.random.Generator
    metrics: MetricsLog
    async_mode: AsyncSettings | None
    windows: VersionWindows
    agents: AgentRoster

    def _intake(self, state: RoundState) -> UpdateIntake: ...

    def _announce(self, state: RoundState) -> None: ...


def restore(service: Restorable) -> OpenRound | None:
    """Continue from the checkpoint; re-open (and replay) its next round if announced."""
    if service.durable is None:
        return None
    durable, cfg = service.durable, service.cfg
    restored = durable.restore()  # CheckpointError (a ValueError): exit 1
    ckpt, jr = restored.checkpoint, restored.open_round
    continue_run(service, restored.run)
    if ckpt is not None:
        if {n: tuple(v.shape) for n, v in ckpt.params.items()} != service.shapes:
            # Same settings, another build of the model: a plugin changed version.
            raise CheckpointError(
                f"the checkpoint's model is another architecture than {cfg.model!r} "
                f"as built here (fingerprint {service.evaluator.fingerprint}): install the "
                "model version it was trained with, or use another --state-dir"
            )
        # In the model's tensor order, not the file's (sorted): the download quantizer
        # draws its rounding noise tensor by tensor, so a resumed run draws as before.
        order = list(service.shapes)
        service.params = {n: ckpt.params[n] for n in order}
        service.model_hash, service.round_id = ckpt.model_hash, ckpt.round
        res = ckpt.residual
        service.downloads.residual = None if res is None else {n: res[n] for n in order}
        service.strategy.load_state(ckpt.strategy_tensors, ckpt.strategy)
        set_rng_state(service.rng, ckpt.rng_state)
        service.metrics.entries = service.metrics.earlier(ckpt.round)
        log.info("resumed from checkpoint: %d rounds applied", ckpt.round)
    if jr is None or jr.round > cfg.rounds:
        return None
    ann = jr.announce
    set_rng_state(service.rng, ann["rng_state"])
    started = service.clock.time()
    # A full window after a crash: agents must notice the re-announcement and re-send.
    deadline = max(float(ann["deadline"]), started + cfg.round_timeout)
    state: RoundState
    if service.async_mode is not None:
        state = service.windows.next(jr.round, service.model_hash, deadline, started)
        state.extensions = int(ann["extensions"])
    else:
        state = RoundState(
            jr.round,
            service.model_hash,
            set(ann["selected"]),
            cfg.min_clients,
            deadline,
            started,
            extensions=int(ann["extensions"]),
        )
    intake = service._intake(state)
    for site in durable.journal.sites(jr):  # before their statuses: replayed as partials
        service.agents.note_site(site)
    for client, payload in durable.journal.frames(jr):
        # An async window's updates name their base round (the frame's), not the window.
        base = read_header(payload).round if service.async_mode is not None else jr.round
        verdict = intake.offer(base, client, payload).verdict
        if not verdict.accepted:
            log.error("journaled update of %s refused on replay: %s", client, verdict.reason)
    log.info("round %d resumed with %d journaled updates", jr.round, len(state.accepted))
    service._announce(state)
    return OpenRound(state, intake, started)


def continue_run(service: Restorable, saved: int | None) -> None:
    """Continue the state directory's run (or start this one); everything signs with it."""
    assert service.durable is not None
    service.run_epoch = resolve_run(service.cfg.run, saved, service.run_epoch)
    service.downloads.run = service.exporter.run = service.durable.run = service.run_epoch
