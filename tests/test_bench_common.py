"""bench/common.py's statistics and table, on made-up results (no process is started)."""

from __future__ import annotations

import pytest

from bench.common import Result, pick_named, ratios, render_tables


def _result(backend: str, values: list[float], *, reference: bool = False,
            higher_is_better: bool = True, unit: str = "Mpps") -> Result:
    r = Result("net", "g2b_64", "guest→back-end, 64 B", backend, backend, unit=unit,
               reference=reference, higher_is_better=higher_is_better)
    for rep, v in enumerate(values):
        r.add(v, rep)
    return r


def test_ratio_of_best_runs_pairs_the_highest_rates() -> None:
    # A slow spell hit the candidate's repetitions 0-2 and the reference's repetition 4.
    ref = _result("dpdk", [16.0, 17.0, 16.5, 16.8, 5.2], reference=True)
    vh = _result("vhostpy", [4.8, 4.9, 5.0, 15.6, 15.4])
    info = ratios([ref, vh])[("net", "g2b_64", "vhostpy")]
    assert info["of_medians"] == pytest.approx(5.0 / 16.5)
    assert info["of_best"] == pytest.approx(15.6 / 17.0)
    assert info["per_repetition"][4] == pytest.approx(15.4 / 5.2)
    assert info["min"] == pytest.approx(4.9 / 17.0) and info["median"] == pytest.approx(5.0 / 16.5)


def test_ratio_of_best_runs_takes_the_lowest_cost_when_lower_is_better() -> None:
    ref = _result("qsd", [22.0, 25.0, 40.0], reference=True, higher_is_better=False, unit="µs")
    vh = _result("vhostpy", [21.0, 30.0, 24.0], higher_is_better=False, unit="µs")
    assert vh.best == 21.0 and ref.best == 22.0
    assert ratios([ref, vh])[("net", "g2b_64", "vhostpy")]["of_best"] == pytest.approx(21 / 22)


def test_table_shows_both_ratios_and_a_dash_without_values() -> None:
    ref = _result("dpdk", [10.0, 12.0], reference=True)
    vh = _result("vhostpy", [6.0, 9.0])
    empty = _result("vhostpy-python", [])
    md = render_tables([ref, vh, empty])
    assert "ratio of medians (per-repetition min–max) | ratio of best runs |" in md
    assert "| 0.682 (0.600–0.750) | 0.750 |" in md, md
    assert "| reference |  |" in md, md
    assert "| 0 | — | — |" in md, md


def test_pick_named_keeps_the_given_order_and_refuses_unknown_names() -> None:
    known = {"a": 1, "b": 2, "c": 3}
    assert pick_named(None, known, "job") == []
    assert pick_named("c, a,", known, "job") == [3, 1]
    assert pick_named(["b"], known, "job") == [2]
    with pytest.raises(ValueError, match=r"unknown job 'd' \(known: a, b, c\)"):
        pick_named("a,d", known, "job")


def test_net_case_filter_keeps_each_cases_reference() -> None:
    from bench.net import net_cases, selected_cases

    every = net_cases()
    assert selected_cases(every, None, None) == every
    (loop,) = selected_cases(every, "loop_1500", "vhostpy")
    assert [b.key for b in loop.backends] == ["dpdk", "vhostpy"]
    assert loop.backends[0].reference
    # a back-end no chosen case has leaves nothing to compare: the case is dropped
    assert [c.key for c in selected_cases(every, "g2b_64,loop_64", "dpdk-io")] == ["loop_64"]
    with pytest.raises(ValueError, match="unknown net case 'loop'"):
        selected_cases(every, "loop", None)
