"""bench.fresh's table: what each batch's row says."""

from __future__ import annotations

from bench.fresh import table


def _row(batch: str, measured: float, predicted: float, **kw) -> dict:
    return {"batch": batch, "requests": 10, "measured_s": measured, "predicted_s": predicted,
            "lower_bound_s": measured / 2, **kw}


def test_each_row_gives_the_error_the_profiles_ratio_and_the_probe_during_the_batch() -> None:
    results = {"batches": [], "runs": {"samullm": {
        "fresh": [_row("mixed", 20.0, 18.0, probe_during_s=0.0712)],
        "profiles": [_row("mixed", 16.0, 16.0)]}}}  # a run from before the probe was sampled
    rows = table(results)
    assert rows[0].endswith("| profiles' measured / this | probe during s |")
    assert rows[2] == ("| samullm | 1: mixed (10) | fresh | 20.0 | 18.0 | -10% | 10.0 | 2.00× "
                       "| 0.80× | 0.071 |")
    assert rows[3].startswith("| samullm | 1: mixed (10) | profiles | 16.0 | 16.0 | +0% |")
    assert rows[3].endswith("| – | – |")
