"""Shapes no engine served: their latency correction from the online calibration's fits of the
shapes that were (`scheduler.online`).

`correction`: the same model's fitted shapes, each times the ratio between
the two shapes that other models' fits show on this device kind (TP 2 against TP 1, 2 threads
against 1), or times 1 when no other model ran both and the two bases are of one family (measured
or modelled); else, for a model never served, the other models' fits at this very shape; else
every fit of the base's family on this device kind, so that no shape is left at its bare base
beside shapes corrected. Another model's fit lends its overall factor (`overall`: measured over
the base's replay, both scales alike), not its split into per-token and per-step terms, which one
batch of like requests hardly tells. Nothing is derived from a derived correction.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from scheduler.calibration import scale_latency
from scheduler.latency import LatencyModel
from scheduler.online import ShapeFit
from scheduler.served import ShapeKey


@dataclass(frozen=True)
class Correction:
    """The scales a shape's base gets, and where they come from ("online" or "derived")."""

    token_scale: float
    step_scale: float
    source: str
    detail: str
    cold_s: float | None = None  # a served shape's fresh-engine one-off cost (None: not measured)

    def apply(self, model: LatencyModel) -> LatencyModel:
        return scale_latency(model, self.token_scale, self.step_scale)


def family(kind: str) -> str:
    """Bases whose errors are alike: measured for the shape, or modelled."""
    return "measured" if kind == "profile" else "modelled"


def shape_name(key: ShapeKey) -> str:
    return f"TP{key[1]}" + (f"x{key[2]} threads" if key[2] > 1 else "")


def overall(fit: ShapeFit) -> float:
    """How much slower than its base the shape served: its measured time over the base's replay
    of it (the scales' geometric mean when there is no replayed time)."""
    if fit.before_s > 0 and fit.measured_s > 0:
        return fit.measured_s / fit.before_s
    return math.sqrt(fit.token_scale * fit.step_scale)


def _geo(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def correction(fits: Mapping[ShapeKey, ShapeFit], key: ShapeKey, kind: str) -> Correction | None:
    """The scales for shape `key` whose base is of `kind` (see the module docstring), or None:
    nothing served tells anything about it (the base as it is)."""
    hit = fits.get(key)
    if hit is not None and hit.kind == kind:
        return Correction(hit.token_scale, hit.step_scale, "online",
                          f"{hit.served} requests served", hit.cold_s)
    model, _, _, dev = key
    ests: list[tuple[float, float]] = []
    notes = []
    for k, f in sorted(fits.items()):
        if k[0] != model or k[3] != dev or k == key:
            continue
        peers = [(n, fits[(n[0], *key[1:])], g) for n, g in fits.items()
                 if n[0] != model and n[1:] == k[1:] and g.kind == f.kind
                 and (n[0], *key[1:]) in fits and fits[(n[0], *key[1:])].kind == kind]
        if peers:
            rt = _geo([t.token_scale / g.token_scale for _, t, g in peers])
            rs = _geo([t.step_scale / g.step_scale for _, t, g in peers])
            ests.append((f.token_scale * rt, f.step_scale * rs))
            notes.append(f"{shape_name(k)} x {shape_name(key)}/{shape_name(k)} of "
                         + ", ".join(sorted(n[0] for n, _, _ in peers)))
        elif family(f.kind) == family(kind):
            ests.append((f.token_scale, f.step_scale))
            notes.append(shape_name(k))
    if ests:
        return Correction(_geo([e[0] for e in ests]), _geo([e[1] for e in ests]), "derived",
                          f"from {model} " + "; ".join(notes))
    # another model's fit lends its overall factor, not its two scales: how a shape's time splits
    # into per-token and per-step terms is all but unidentifiable from one batch of like
    # requests (tiny-a fitted 5.15 / 0.02 where it ran 1.76x its profile, 6 Dec 2026), and on
    # another model's split the pair would move it by anything from 0.02x to 5x
    others = sorted((k, f) for k, f in fits.items()
                    if k[0] != model and k[1:] == key[1:] and f.kind == kind)
    if others:
        lent = _geo([overall(f) for _, f in others])
        return Correction(lent, lent, "derived",
                          f"from {', '.join(k[0] for k, _ in others)} at this shape")
    # nothing served at this shape nor of this model: what every served shape of the base's
    # family says. Left uncorrected beside shapes that are, it was priced by its base alone next
    # to them: the machine serving 1.6x slower than the profiles made a never-served TP 2 look
    # 1.6x faster than the TP 1 whose scales other models lent it (fairness bench, 6 Dec 2026)
    every = sorted((k, f) for k, f in fits.items()
                   if k[3] == dev and family(f.kind) == family(kind))
    if every:
        lent = _geo([overall(f) for _, f in every])
        return Correction(lent, lent, "derived",
                          "from every served shape: " + ", ".join(
                              f"{k[0]} {shape_name(k)}" for k, _ in every))
    return None
