"""``fedmq bench sites --cut-site NAME --cut-rounds K``: one site's bridge down for K rounds.

The site's bridge reaches the central broker through a :class:`~aggregator.ops.netproxy.NetProxy`
(its WAN). As soon as the site's status (bridged up) says it is summing round
:data:`FIRST_CUT_ROUND`, the bench cuts the proxy (the open connection dies, the bridge's
reconnects are refused): the site's partial of that round, unless it crossed first, waits in
the site broker's queue. When the central aggregator announces round ``FIRST_CUT_ROUND + K``,
the bench heals it. Meanwhile the central rounds close at their deadline with the other sites
(quorum S-1). :func:`cut_verdict`
checks that nothing was counted twice: every round's participants are unique, and each cut
round's partial of the site was counted once, refused with a receipt, or never sent.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aggregator.ops.bench.sites_report import SitesEvents
from aggregator.ops.netproxy import NetProxy

FIRST_CUT_ROUND = 2  # round 1 runs with every site, so all of them are known to central


def add_cut_arguments(p: argparse.ArgumentParser) -> None:
    """The cut's flags of ``fedmq bench sites``."""
    p.add_argument(
        "--cut-site",
        help=f"cut this site's bridge once it sums round {FIRST_CUT_ROUND}, for --cut-rounds "
        "rounds (sites layout; e.g. site-1)",
    )
    p.add_argument("--cut-rounds", type=int, default=2, help="rounds without the site (2)")
    p.add_argument(
        "--cut-pace-ms",
        type=float,
        default=400.0,
        help="with --cut-site: each device's least time per batch, so that rounds last "
        "longer than the bridge's reconnect and the site can take part again (default 400)",
    )
    p.add_argument(
        "--cut-deadline",
        type=float,
        default=30.0,
        help="with --cut-site: the central rounds' timeout, after which they close without "
        "the cut site (default 30 s)",
    )


def check_cut_arguments(args: argparse.Namespace, sites: list[str]) -> str | None:
    """What is wrong with the cut's flags (None: nothing, or no cut asked)."""
    if args.cut_site is None:
        return None
    if args.cut_site not in sites:
        return f"--cut-site {args.cut_site}: not one of {', '.join(sites)}"
    if len(sites) < 2:
        return "--cut-site needs --sites 2 or more (the others carry the cut rounds)"
    least = FIRST_CUT_ROUND + args.cut_rounds + 2
    if args.cut_rounds < 1 or args.rounds < least:
        return (
            f"--cut-rounds {args.cut_rounds}: needs 1 or more, and --rounds at least {least} "
            "(the round announced at the heal still goes without the site: rounds after it "
            "show it back)"
        )
    return None


def cut_rounds(args: argparse.Namespace) -> list[int]:
    """The rounds announced while the bridge is down (the last one at the heal)."""
    if args.cut_site is None:
        return []
    return list(range(FIRST_CUT_ROUND, FIRST_CUT_ROUND + args.cut_rounds + 1))


def affected_rounds(site: str, metrics: list[dict[str, Any]]) -> tuple[list[int], int | None]:
    """The rounds from the cut's first until the site counts again (it is not selected while
    its bridge is down: the central aggregator reads Mosquitto's notification), and the
    round it came back in (None: it did not before the run ended)."""
    rounds = sorted(m["round"] for m in metrics if "round" in m)
    back = [
        m["round"]
        for m in metrics
        if m.get("round", 0) > FIRST_CUT_ROUND and site in m.get("participants", [])
    ]
    rejoined = min(back) if back else None
    end = rejoined if rejoined is not None else max(rounds, default=FIRST_CUT_ROUND) + 1
    return [r for r in rounds if FIRST_CUT_ROUND <= r < end], rejoined


@dataclass
class BridgeCut:
    """Cuts ``proxy`` once the site sums round ``first`` (or round ``first + 1`` is announced)
    and heals it when round ``first + rounds`` is announced."""

    site: str
    proxy: NetProxy
    first: int
    rounds: int
    cut_at: float | None = None
    healed_at: float | None = None
    log: list[str] = field(default_factory=list)

    def follow(self, events: SitesEvents) -> None:
        """Act on the announcements seen so far (called after every observed message)."""
        status = events.site_status.get(self.site)
        summing = status is not None and max(status.round, status.open_round) >= self.first
        if self.cut_at is None and (summing or self.first + 1 in events.starts):
            self.proxy.cut()
            self.cut_at = time.time()
            self._say(f"{self.site} sums round {self.first}: its bridge cut")
        elif (
            self.cut_at is not None
            and self.healed_at is None
            and self.first + self.rounds in events.starts
        ):
            self.heal(f"round {self.first + self.rounds} announced")

    def heal(self, why: str) -> None:
        """Let the bridge reconnect (idempotent)."""
        if self.healed_at is not None or self.cut_at is None:
            return
        self.proxy.heal()
        self.healed_at = time.time()
        self._say(f"{why}: {self.site}'s bridge healed")

    def _say(self, text: str) -> None:
        self.log.append(text)
        print(f"    {text}", flush=True)


def cut_verdict(site: str, metrics: list[dict[str, Any]], events: SitesEvents) -> dict[str, Any]:
    """Whether anything was counted twice around the cut, what became of each cut round's
    partial of ``site`` (central's receipts for it, whether it was counted), and whether the
    site took part again before the run ended."""
    rounds, rejoined = affected_rounds(site, metrics)
    by_round = {m["round"]: list(m.get("participants", [])) for m in metrics if "round" in m}
    unique = all(len(p) == len(set(p)) for p in by_round.values())
    accepted = Counter((r, s) for r, s, code in events.site_receipts if code == "accepted")
    per_round = []
    for r in rounds:
        counted = by_round.get(r, []).count(site)
        codes = [code for rr, s, code in events.site_receipts if rr == r and s == site]
        sent = events.partials.get(r, []).count(site)
        refused = any(code not in ("accepted", "duplicate") for code in codes)
        ok = (counted == 1 and accepted[(r, site)] == 1) or (
            counted == 0 and accepted[(r, site)] == 0 and (sent == 0 or refused)
        )
        per_round.append(
            {"round": r, "partials_sent": sent, "receipts": codes, "counted": counted, "ok": ok}
        )
    once = all(n == 1 for n in accepted.values())
    return {
        "site": site,
        "rounds": per_round,
        "rejoined_at": rejoined,
        "participants_unique": unique,
        "each_partial_accepted_once": once,
        "ok": unique and once and rejoined is not None and all(r["ok"] for r in per_round),
    }


def cut_summary(verdict: dict[str, Any]) -> str:
    """One line per cut round, and whether anything was counted twice."""
    lines = [
        f"cut {verdict['site']}, round {r['round']}: partials sent {r['partials_sent']}, "
        f"central's receipts {r['receipts'] or 'none'}, counted {r['counted']}"
        for r in verdict["rounds"]
    ]
    twice = "nothing counted twice" if verdict["ok"] else "COUNTED TWICE OR LOST"
    return "\n".join([*lines, f"cut {verdict['site']}: {twice}"])
