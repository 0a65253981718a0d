"""The champion/challenger gate: should a registered version replace the `champion`, and the decision recorded.

`gate` is a pure function of two metric sets and the register config: the challenger wins when it beats the
current `champion` on `register.metric` in `register.direction` by more than `register.min_delta` (a tie never
wins) and passes every guard; with no champion it wins if the guards pass. `decide` applies it to a version of
the registry, holding the model's gate lock (`milora.tracking.gate_lock`), and moves `champion` when it wins;
`record` writes the decision, both values and the reason as version tags, as run tags and as a `decisions/`
artifact of the run. A recorded decision is never re-decided (`recorded_or_decide`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import getpass
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from milora.pipeline.config import RegisterConfig
from milora.tracking.gate_lock import gate_lock
from milora.tracking.lookups import alias_version, is_missing, version_metrics
from milora.tracking.scrub import scrub

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_DECISION = "milora.decision"  # "promoted" | "not_promoted"; written last: it marks a decision as recorded


@dataclass(frozen=True)
class Decision:
    """The outcome of the champion gate for one model version."""

    promote: bool
    reason: str
    metric: str
    challenger_value: float | None = None
    champion_value: float | None = None
    champion_version: str | None = None
    direction: str = "maximize"
    min_delta: float = 0.0
    source: str = "auto"  # auto (the register step) | manual (`milora promote`)
    forced: bool = False

    def tags(self) -> dict[str, str]:
        """The decision as `milora.decision*` / `milora.gate.*` tags (the decision tag itself last)."""
        def fmt(v: Any) -> str:
            return "" if v is None else repr(v) if isinstance(v, float) else str(v)

        return {
            "milora.gate.metric": self.metric,
            "milora.gate.direction": self.direction,
            "milora.gate.min_delta": fmt(self.min_delta),
            "milora.gate.challenger_value": fmt(self.challenger_value),
            "milora.gate.champion_value": fmt(self.champion_value),
            "milora.gate.champion_version": fmt(self.champion_version),
            "milora.decision.reason": self.reason,
            "milora.decision.source": self.source,
            "milora.decision.forced": str(self.forced).lower(),
            "milora.decision.at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            TAG_DECISION: "promoted" if self.promote else "not_promoted",
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Decision:
        """A recorded decision read back from version tags."""
        def num(key: str) -> float | None:
            v = tags.get(key, "")
            return float(v) if v not in ("", None) else None

        return cls(
            promote=tags.get(TAG_DECISION) == "promoted",
            reason=tags.get("milora.decision.reason", ""),
            metric=tags.get("milora.gate.metric", ""),
            challenger_value=num("milora.gate.challenger_value"),
            champion_value=num("milora.gate.champion_value"),
            champion_version=tags.get("milora.gate.champion_version") or None,
            direction=tags.get("milora.gate.direction", "maximize"),
            min_delta=num("milora.gate.min_delta") or 0.0,
            source=tags.get("milora.decision.source", "auto"),
            forced=tags.get("milora.decision.forced") == "true",
        )


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _did_you_mean(name: str, metrics: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, [k for k in metrics if _num(metrics[k]) is not None], n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def gate(
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    rc: RegisterConfig,
    champion_version: str | None = None,
) -> Decision:
    """Should the challenger replace the champion? Pure function of both metric sets and the config.

    Wins iff every guard passes and, when there is a champion, the improvement on `rc.metric` in
    `rc.direction` is more than `rc.min_delta` (so a tie never wins). Guards (on any recorded metric):
    `max_value` / `min_value` bound the challenger's value (also with no champion); `max_increase` /
    `max_decrease` bound its change from the champion.
    """
    metric = rc.metric
    base = dict(metric=metric, direction=rc.direction, min_delta=rc.min_delta, champion_version=champion_version)
    c = _num(challenger.get(metric))
    p = _num(champion.get(metric)) if champion is not None else None
    base.update(challenger_value=c, champion_value=p)
    if c is None:
        return Decision(False, f"the challenger has no '{metric}' metric{_did_you_mean(metric, challenger)}: cannot "
                               "gate it (register.metric names any metric of the run: average_accuracy, "
                               "suites_average, suites.<name>.accuracy, lm_eval.<task>.<metric>, ...)", **base)
    failures, notes = [], []
    for g in rc.guards:
        v = _num(challenger.get(g.metric))
        if v is None:
            failures.append(f"guard {g.metric}: the challenger has no such metric{_did_you_mean(g.metric, challenger)}")
            continue
        if g.max_value is not None and v > g.max_value:
            failures.append(f"guard {g.metric}: {v:.6g} > max_value {g.max_value:g}")
        if g.min_value is not None and v < g.min_value:
            failures.append(f"guard {g.metric}: {v:.6g} < min_value {g.min_value:g}")
        for bound, sign, limit in (("max_increase", 1, g.max_increase), ("max_decrease", -1, g.max_decrease)):
            if limit is None or champion is None:
                continue
            prev = _num(champion.get(g.metric))
            if prev is None:
                notes.append(f"guard {g.metric}: the champion has no such metric, {bound} not checked")
            elif sign * (v - prev) > limit + 1e-12:
                failures.append(f"guard {g.metric}: {'rose' if sign > 0 else 'fell'} by {abs(v - prev):.6g} "
                                f"({prev:.6g} -> {v:.6g}) > {bound} {limit:g}")
    note = f" ({'; '.join(notes)})" if notes else ""
    if failures:
        return Decision(False, "; ".join(failures) + note, **base)
    if champion is None:
        return Decision(True, f"no champion yet: {metric} = {c:.6g}{note}", **base)
    if p is None:
        return Decision(False, f"the champion (version {champion_version}) has no '{metric}' metric: cannot "
                               f"compare; use `milora promote --force` to decide by hand{note}", **base)
    gain = c - p if rc.direction == "maximize" else p - c
    eps = 1e-9 * max(1.0, abs(c), abs(p))
    versus = f"{metric} {c:.6g} vs champion {p:.6g} ({rc.direction})"
    if abs(gain) <= eps:
        return Decision(False, f"{versus}: a tie does not promote{note}", **base)
    if gain > rc.min_delta + eps:
        return Decision(True, f"{versus}: better by {gain:.6g} > min_delta {rc.min_delta:g}{note}", **base)
    if gain > 0:
        return Decision(False, f"{versus}: better by only {gain:.6g}, not more than min_delta "
                               f"{rc.min_delta:g}{note}", **base)
    return Decision(False, f"{versus}: worse by {-gain:.6g}{note}", **base)


def decide(
    mlflow_client: MlflowClient,
    name: str,
    version: str,
    challenger_metrics: Mapping[str, Any],
    rc: RegisterConfig,
    source: str = "auto",
    force: bool = False,
    locked: bool = False,
) -> Decision:
    """Gate `version` against the current champion, move `champion` if it wins, and record the decision,
    holding the model's gate lock (`gate_lock`; `locked`: the caller holds it already)."""
    with contextlib.nullcontext() if locked else gate_lock(mlflow_client, name):
        champ = alias_version(mlflow_client, name, CHAMPION)
        fields = dict(metric=rc.metric, direction=rc.direction, min_delta=rc.min_delta, source=source)
        if champ is not None and str(champ.version) == str(version):
            value = _num(challenger_metrics.get(rc.metric))
            d = Decision(True, f"version {version} is already the champion", challenger_value=value,
                         champion_value=value, champion_version=str(version), **fields)
        else:
            champ_metrics = version_metrics(mlflow_client, champ) if champ is not None else None
            d = replace(gate(challenger_metrics, champ_metrics, rc, str(champ.version) if champ else None), source=source)
            if force and not d.promote:
                d = replace(d, promote=True, forced=True, reason=f"forced by hand; the gate said: {d.reason}")
            if d.promote:
                mlflow_client.set_registered_model_alias(name, CHAMPION, str(version))
        record(mlflow_client, name, str(version), d)
        log.info("%s version %s: %s (%s)", name, version, "promoted to champion" if d.promote else "not promoted",
                 d.reason)
        return d


def record(mlflow_client: MlflowClient, name: str, version: str, d: Decision) -> None:
    """Write a decision as version tags, as tags of the version's run and as a run artifact."""
    from mlflow.exceptions import MlflowException

    tags = {k: scrub(v) for k, v in d.tags().items()}
    for k, v in tags.items():  # the decision tag comes last: it marks the decision as recorded
        mlflow_client.set_model_version_tag(name, version, k, v)
    mv = mlflow_client.get_model_version(name, version)
    if not mv.run_id:
        return
    try:
        for k, v in tags.items():
            mlflow_client.set_tag(mv.run_id, k, v)
        try:
            who = getpass.getuser()
        except (KeyError, OSError):
            who = "unknown"
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")  # one file per decision
        mlflow_client.log_dict(mv.run_id, {**asdict(d), "model_name": name, "version": version, "by": who,
                                           "at": tags["milora.decision.at"]},
                               f"decisions/v{version}-{d.source}-{stamp}.json")
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        log.warning("the run %s of %s version %s is gone: decision recorded on the version only",
                    mv.run_id, name, version)


def recorded_or_decide(mlflow_client: MlflowClient, name: str, version: str, metrics: Mapping[str, Any],
                       rc: RegisterConfig) -> Decision:
    """The decision recorded on `version`, else the gate's (the caller holds the gate lock)."""
    recorded = mlflow_client.get_model_version(name, version).tags
    if TAG_DECISION in recorded:
        decision = Decision.from_tags(recorded)
        log.info("%s version %s was already decided: %s", name, version, decision.reason)
        return decision
    return decide(mlflow_client, name, version, metrics, rc, locked=True)
