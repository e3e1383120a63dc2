"""Output lengths: censoring-aware empirical distributions per (model, endpoint), learned online.

A request's output ends *naturally* (EOS, stop string) or is *capped* by its `max_tokens` or the
context left (`max_model_len − prompt_len`). A capped length only says "the natural length is longer
than this": it is a right-censored observation. `LengthDistribution` estimates the distribution of
natural lengths with the (weighted) Kaplan–Meier estimator; the survival mass left beyond the longest
natural ending it has seen is kept as "longer than anything seen", which sampling turns into the
request's cap. So a model observed only hitting its caps samples its caps (a tiny random model that
never emits EOS), and capped observations never invent shorter natural endings.

Prior. A new distribution starts from a quantile table of a real trace (`scheduler/data/
length_prior.json`, made by `bench/derive_length_prior.py`; chat and completions endpoints use the
Azure conversation trace). The table enters the estimator as pseudo-observations (natural endings at
its quantiles) whose total weight decays as real observations arrive:

    w_prior(n) = W · n0 / (n0 + n),   W = n0 = 50 by default,

so with no data the prior is the whole distribution, after 50 observations it weighs 25 against 50
(a third), after 1000 about 2.4 against 1000 (0.2%).
Pure: the runtime persists `to_dict()` and restores with `from_dict()`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from scheduler.data import load_json

# prompt estimates (`LengthModel.prompt_scale`): the estimate's own weight before any count, in
# tokens, and the decay of every earlier answer at each new one (the newest ~512 weigh most)
PROMPT_PRIOR_TOKENS = 1000.0
PROMPT_DECAY = 1.0 - 1.0 / 512
PROMPT_SCALE_BOUNDS = (0.1, 10.0)
PRIOR_WEIGHT = 50.0  # W: pseudo-observations the prior is worth before any data
PRIOR_HALF = 50.0  # n0: observations after which the prior's weight has halved
EMBEDDINGS = "/v1/embeddings"
DEFAULT_TRACE = "conversation"  # chat/completions endpoints and anything unknown
ENDPOINT_TRACE = {"/v1/chat/completions": "conversation", "/v1/completions": "conversation"}


def prior_quantiles(trace: str = DEFAULT_TRACE, kind: str = "decode") -> np.ndarray:
    """Equal-probability quantiles of `kind` ("decode" or "prefill") tokens of a shipped trace
    ("conversation", "code", "arxiv")."""
    return np.asarray(load_json("length_prior.json")["traces"][trace][kind]["quantiles"], dtype=int)


class LengthDistribution:
    """Distribution of natural output lengths from a prior table plus (censored) observations."""

    def __init__(self, prior: Sequence[int] | np.ndarray | None = None,
                 prior_weight: float = PRIOR_WEIGHT, prior_half: float = PRIOR_HALF) -> None:
        self.prior = np.asarray(prior if prior is not None else [], dtype=int)
        self.prior_weight = float(prior_weight)
        self.prior_half = float(prior_half)
        self.natural: dict[int, int] = {}
        self.capped: dict[int, int] = {}
        self._table: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_observations(self) -> int:
        return sum(self.natural.values()) + sum(self.capped.values())

    def observe(self, length: int, capped: bool) -> None:
        """Record one finished request: `length` output tokens, `capped` when it hit its cap."""
        length = max(1, int(length))
        bag = self.capped if capped else self.natural
        bag[length] = bag.get(length, 0) + 1
        self._table = None

    def current_prior_weight(self) -> float:
        if self.prior.size == 0:
            return 0.0
        return self.prior_weight * self.prior_half / (self.prior_half + self.num_observations)

    def _km(self) -> tuple[np.ndarray, np.ndarray]:
        """(support values, CDF at them); 1 − CDF[-1] is the mass longer than anything seen."""
        if self._table is not None:
            return self._table
        w_prior = self.current_prior_weight()
        vals = [self.prior, np.fromiter(self.natural, int, len(self.natural)),
                np.fromiter(self.capped, int, len(self.capped))]
        wts = [np.full(self.prior.size, w_prior / max(1, self.prior.size)),
               np.fromiter(self.natural.values(), float, len(self.natural)),
               np.fromiter(self.capped.values(), float, len(self.capped))]
        dead = [np.ones(self.prior.size, bool), np.ones(len(self.natural), bool),
                np.zeros(len(self.capped), bool)]
        v, w, d = np.concatenate(vals), np.concatenate(wts), np.concatenate(dead)
        keep = w > 0
        v, w, d = v[keep], w[keep], d[keep]
        if v.size == 0:
            self._table = (np.zeros(0, int), np.zeros(0))
            return self._table
        uniq, inv = np.unique(v, return_inverse=True)
        deaths = np.bincount(inv, weights=w * d, minlength=uniq.size)
        total = np.bincount(inv, weights=w, minlength=uniq.size)
        at_risk = np.cumsum(total[::-1])[::-1]  # weight with value >= v (censored at v included)
        surv = np.cumprod(1.0 - deaths / at_risk)
        support = deaths > 0
        self._table = (uniq[support], 1.0 - surv[support])
        return self._table

    def sample(self, rng: np.random.Generator, caps: np.ndarray) -> np.ndarray:
        """One length per cap: a natural length drawn from the estimate, cut to the cap (≥ 1).
        With no information at all every request runs to its cap."""
        caps = np.maximum(1, np.asarray(caps, dtype=np.int64))
        values, cdf = self._km()
        u = rng.random(caps.size)
        if values.size == 0:
            return caps.copy()
        idx = np.searchsorted(cdf, u, side="right")
        big = np.iinfo(np.int64).max
        drawn = np.where(idx < values.size, values[np.minimum(idx, values.size - 1)], big)
        return np.clip(drawn, 1, caps)

    def mean(self, cap: int) -> float:
        """Expected length under a single cap (for diagnostics)."""
        values, cdf = self._km()
        p = np.diff(np.concatenate([[0.0], cdf]))
        return float(np.sum(p * np.minimum(values, cap)) + (1 - (cdf[-1] if cdf.size else 0)) * cap)

    def to_dict(self) -> dict[str, Any]:
        return {"prior": self.prior.tolist(), "prior_weight": self.prior_weight,
                "prior_half": self.prior_half,
                "natural": sorted(self.natural.items()), "capped": sorted(self.capped.items())}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LengthDistribution":
        dist = cls(d.get("prior", []), d.get("prior_weight", PRIOR_WEIGHT),
                   d.get("prior_half", PRIOR_HALF))
        dist.natural = {int(k): int(c) for k, c in d.get("natural", [])}
        dist.capped = {int(k): int(c) for k, c in d.get("capped", [])}
        return dist


class LengthModel:
    """Output-length distributions per (model, endpoint), each created on first use from the
    endpoint's prior. Embedding requests produce no tokens: they cost one prefill (length 1).

    Also the correction of prompt estimates per (model, endpoint): validation estimates a prompt
    from its characters (`gateway.tokens`), and the engines' counts teach the ratio, weighted to
    the newest answers (`prompt_scale`). `bench.fresh`'s prompts (random vocabulary words) were
    estimated 25 % long, so their prefill was planned 25 % long."""

    def __init__(self, priors: dict[str, np.ndarray] | None = None) -> None:
        """`priors`: endpoint → decode-length quantile table; None = the shipped trace tables."""
        self.priors = priors
        self.dists: dict[tuple[str, str], LengthDistribution] = {}
        # (model, endpoint) -> decayed sums of (estimated, counted) prompt tokens, prior included
        self.prompts: dict[tuple[str, str], tuple[float, float]] = {}

    def observe_prompt(self, model: str, endpoint: str, estimated: int, counted: int) -> None:
        """An answer whose prompt the engine counted `counted` tokens, estimated `estimated`."""
        if estimated <= 0 or counted <= 0:
            return
        est, got = self.prompts.get((model, endpoint), (PROMPT_PRIOR_TOKENS, PROMPT_PRIOR_TOKENS))
        self.prompts[(model, endpoint)] = (est * PROMPT_DECAY + estimated,
                                           got * PROMPT_DECAY + counted)

    def prompt_scale(self, model: str, endpoint: str) -> float:
        """What an estimated prompt of (model, endpoint) is multiplied by to plan (1: none seen)."""
        est, got = self.prompts.get((model, endpoint), (1.0, 1.0))
        lo, hi = PROMPT_SCALE_BOUNDS
        return min(hi, max(lo, got / est))

    def _prior_for(self, endpoint: str) -> np.ndarray:
        if self.priors is not None:
            return np.asarray(self.priors.get(endpoint, self.priors.get("*", [])), dtype=int)
        return prior_quantiles(ENDPOINT_TRACE.get(endpoint, DEFAULT_TRACE))

    def distribution(self, model: str, endpoint: str) -> LengthDistribution:
        key = (model, endpoint)
        if key not in self.dists:
            self.dists[key] = LengthDistribution(self._prior_for(endpoint))
        return self.dists[key]

    def observe(self, model: str, endpoint: str, length: int, capped: bool) -> None:
        if endpoint != EMBEDDINGS:
            self.distribution(model, endpoint).observe(length, capped)

    def sample(self, model: str, endpoint: str, caps: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
        caps = np.asarray(caps, dtype=np.int64)
        if endpoint == EMBEDDINGS:
            return np.ones(caps.size, dtype=np.int64)
        return self.distribution(model, endpoint).sample(rng, caps)

    def to_dict(self) -> dict[str, Any]:
        return {"distributions": [{"model": m, "endpoint": e, "dist": d.to_dict()}
                                  for (m, e), d in sorted(self.dists.items())],
                "prompts": [{"model": m, "endpoint": e, "estimated": est, "counted": got}
                            for (m, e), (est, got) in sorted(self.prompts.items())]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], priors: dict[str, np.ndarray] | None = None
                  ) -> "LengthModel":
        lm = cls(priors)
        for item in d.get("distributions", []):
            lm.dists[(item["model"], item["endpoint"])] = LengthDistribution.from_dict(item["dist"])
        for item in d.get("prompts", []):
            lm.prompts[(item["model"], item["endpoint"])] = (float(item["estimated"]),
                                                             float(item["counted"]))
        return lm
