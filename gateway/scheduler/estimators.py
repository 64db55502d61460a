"""Learned estimators: load bandwidths per node and tier, resume time per model.

Both are small accumulators fed by the gateway from what nodes report (loads with tier, bytes
and seconds; migrations with tokens and seconds) and read into a ClusterSnapshot. No clock, no
I/O: the caller says what was observed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.scheduler.types import DEFAULT_BANDWIDTHS, MigrationFit
from sllm.errors import InvalidInput

# Variance of the observed token counts below which the slope is not identifiable (all resumes
# had the same length): keep the prior slope and fit the intercept only.
_MIN_SPREAD = 1e-9
_DEFAULTS: dict[str, float] = {str(k): v for k, v in DEFAULT_BANDWIDTHS.items()}


@dataclass
class MigrationModel:
    """Least-squares fit of resume seconds = a * tokens + b over observed migrations.

    Keeps the sufficient statistics (n, sums) so each observation is O(1). Before any data the
    prior is returned; with one observation, or observations all of one length, the prior slope
    is kept and the intercept fitted. a and b are clamped at >= 0 (a resume never gets faster
    with more tokens, nor takes negative time).
    """

    prior: MigrationFit = field(default_factory=MigrationFit)
    n: int = 0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 0:
            raise InvalidInput(f"migration tokens must be >= 0, got {tokens}")
        if not math.isfinite(seconds) or seconds < 0:
            raise InvalidInput(f"migration seconds must be finite and >= 0, got {seconds}")
        x = float(tokens)
        self.n += 1
        self.sx += x
        self.sy += seconds
        self.sxx += x * x
        self.sxy += x * seconds

    def state(self) -> dict[str, float]:
        """The sufficient statistics, to persist: ``restore`` continues the same fit."""
        return {"n": self.n, "sx": self.sx, "sy": self.sy, "sxx": self.sxx, "sxy": self.sxy}

    @classmethod
    def restore(cls, state: Mapping[str, object], prior: MigrationFit) -> MigrationModel:
        """The model whose ``state()`` was ``state``; InvalidInput when it is not one."""
        n = state.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidInput(f"n: expected an observation count >= 0, got {n!r}")
        sums: dict[str, float] = {}
        for key in ("sx", "sy", "sxx", "sxy"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"{key}: expected a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(f"{key}: expected a finite sum of observations, got {value!r}")
            sums[key] = float(value)
        return cls(prior=prior, n=n, **sums)

    def fit(self) -> MigrationFit:
        if self.n == 0:
            return self.prior
        mean_x = self.sx / self.n
        mean_y = self.sy / self.n
        var_x = self.sxx / self.n - mean_x * mean_x
        if self.n < 2 or var_x <= _MIN_SPREAD * max(1.0, mean_x * mean_x):
            a = self.prior.a
        else:
            a = (self.sxy / self.n - mean_x * mean_y) / var_x
        if a < 0:
            a = 0.0
        b = mean_y - a * mean_x
        if b < 0:
            # Refit through the origin: the best slope with b = 0.
            b = 0.0
            a = self.sxy / self.sxx if self.sxx > 0 else a
        return MigrationFit(a=a, b=b)


class MigrationModels:
    """One MigrationModel per model (checkpoint key), sharing a prior."""

    def __init__(self, prior: MigrationFit | None = None) -> None:
        self.prior = prior or MigrationFit()
        self._models: dict[str, MigrationModel] = {}

    def observe(self, checkpoint: str, tokens: int, seconds: float) -> None:
        model = self._models.get(checkpoint)
        if model is None:
            model = self._models[checkpoint] = MigrationModel(prior=self.prior)
        model.observe(tokens, seconds)

    def state(self, checkpoint: str) -> dict[str, float] | None:
        """``checkpoint``'s sufficient statistics (None before any observation)."""
        model = self._models.get(checkpoint)
        return None if model is None else model.state()

    def restore(self, checkpoint: str, state: Mapping[str, object]) -> None:
        """Take ``checkpoint``'s model from a ``state()`` (saved by an earlier gateway)."""
        self._models[checkpoint] = MigrationModel.restore(state, self.prior)

    def fits(self) -> dict[str, MigrationFit]:
        """checkpoint key -> fit, for ClusterSnapshot.migration."""
        return {key: model.fit() for key, model in self._models.items()}


class BandwidthModel:
    """Bandwidth per (node, tier) in bytes/s: an exponentially weighted moving average.

    ``seed`` sets a starting value (the node's startup probe or what its heartbeat reports)
    that observations then move; ``alpha`` is the weight of each new observation (0.3: about
    the last 3 loads dominate, so a tier that slowed down is noticed within a few loads).
    """

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise InvalidInput(f"bandwidth EWMA alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._bw: dict[str, dict[str, float]] = {}
        self._observed: set[tuple[str, str]] = set()

    def seed(self, node: str, tier: str, bytes_per_s: float) -> None:
        """Use ``bytes_per_s`` until a load is observed on that node and tier."""
        if bytes_per_s > 0 and (node, tier) not in self._observed:
            self._bw.setdefault(node, {})[tier] = bytes_per_s

    def observe(self, node: str, tier: str, nbytes: int, seconds: float) -> None:
        """A load of ``nbytes`` from ``tier`` took ``seconds`` (transfer only, no queue wait)."""
        if nbytes <= 0 or not math.isfinite(seconds) or seconds <= 0:
            return  # nothing was transferred, or no duration to learn from
        sample = nbytes / seconds
        table = self._bw.setdefault(node, {})
        old = table.get(tier)
        if old is None:
            table[tier] = sample
        else:
            table[tier] = (1 - self.alpha) * old + self.alpha * sample
        self._observed.add((node, tier))

    def get(self, node: str, tier: str) -> float:
        bw = self._bw.get(node, {}).get(tier)
        if bw is not None:
            return bw
        return _DEFAULTS.get(tier, 0.0)

    def table(self) -> Mapping[str, Mapping[str, float]]:
        """node -> {tier: bytes/s}, for snapshot_from_heartbeats(bandwidths=...)."""
        return {node: dict(tiers) for node, tiers in self._bw.items()}
