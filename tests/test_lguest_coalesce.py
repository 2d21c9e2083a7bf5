"""The vring runner reaches lguest guests: with a loop attached, a streaming guest (the
lguest driver model at queue depth 32, interrupt handler re-arming used_event at once) is
polled and its interrupts coalesced; without one, every completion interrupts it.

Counts, not times: how many interrupts and kicks a run of requests took (bench/lguest_irqs.py
prints the same figures).
"""

from __future__ import annotations

from bench.lguest_irqs import run

REQUESTS = 1000


def test_a_streaming_lguest_guest_is_polled_and_coalesced() -> None:
    on = run(32, REQUESTS, loop_on=True, batch_refill=False)
    off = run(32, REQUESTS, loop_on=False, batch_refill=False)
    assert off["interrupts"] >= REQUESTS * 0.9 and off["kicks"] >= REQUESTS * 0.9, off
    assert on["interrupts"] < REQUESTS / 4, on      # held while streaming, released in groups
    assert on["kicks"] < REQUESTS / 2, on           # polled: kicks stay off meanwhile
