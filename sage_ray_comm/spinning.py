"""How long a ring's waiter spins before it sleeps on the futex, sized to
how long its waits have lately been (:class:`SpinTuner`).

A waiter that finds its frame while it spins costs its writer nothing; one
that went to sleep costs the writer a futex wake (20-40 us on the 2-core VM)
and itself the time to be scheduled again. Waits that keep coming quickly
are worth spinning for; a long one is not, so the spin follows the recent
waits, between a floor and a cap. A replica's request ring and a caller's
reply ring each have one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SpinTuner"]

# The weight of the newest wait in the running mean; how many typical waits
# to spin; and the least change worth a call into the ring.
_WAIT_WEIGHT = 0.125
_SPIN_PER_WAIT = 1.5
_RETUNE_SHARE = 0.1


class SpinTuner:
    """Sizes a ring's spin to the waits its waiter has lately had: 1.5 times
    their running mean, at least ``floor_us``; the floor again once they are
    typically longer than ``cap_us`` (then nothing short is coming, and
    spinning would only burn a core).

    >>> class Ring:
    ...     def set_spin_ns(self, ns):
    ...         self.ns = ns
    >>> ring = Ring()
    >>> tune = SpinTuner(ring, floor_us=50, cap_us=500)
    >>> for _ in range(50):
    ...     tune.waited(80e-6)  # frames 80 us apart: spin about 120 us
    >>> 100_000 < ring.ns <= 120_000
    True
    >>> for _ in range(50):
    ...     tune.waited(2.0)  # then seconds apart: back to the floor
    >>> ring.ns == 50_000
    True
    """

    def __init__(self, ring: Any, floor_us: float, cap_us: float) -> None:
        """``ring``: anything with ``set_spin_ns`` (a SageQueue); it should
        spin ``floor_us`` to begin with."""
        self._ring = ring
        self.floor_us, self.cap_us = floor_us, cap_us
        self.wait_us = self.spin_us = floor_us

    def waited(self, seconds: float) -> None:
        """Takes in how long the last wait took."""
        # A long idle spell counts as a few caps, not as its hours.
        self.wait_us += (min(seconds * 1e6, 4 * self.cap_us) - self.wait_us) * _WAIT_WEIGHT
        typical = self.wait_us
        want = (
            self.floor_us if typical > self.cap_us else min(self.cap_us, max(self.floor_us, _SPIN_PER_WAIT * typical))
        )
        if abs(want - self.spin_us) > _RETUNE_SHARE * self.spin_us:
            self.spin_us = want
            self._ring.set_spin_ns(int(want * 1000))
