"""The loss-based rate controller: the cap reported loss puts on the estimate (gcc-02 §6).

``LossBasedControl`` keeps A_s from the loss fraction of each window of at least
``LOSS_MIN_PACKETS`` reported packets: above ``LOSS_HIGH`` it cuts, below ``LOSS_LOW``
it grows (as far as the acknowledged rate allows, like the delay-based controller),
in between it holds. The viewer's estimate is the lower of it and the delay-based one
(bandwidth.py). Sans-IO: the caller passes each window's loss and ``now``.
"""

from __future__ import annotations

from whepfan.media.rate_control import INCREASE_HEADROOM_BPS, MAX_INCREASE_OVER_ACKNOWLEDGED

LOSS_MIN_PACKETS = 20  # a loss fraction from fewer packets is noise
LOSS_HIGH = 0.10  # §6: above 10 % the loss-based estimate decreases ...
LOSS_LOW = 0.02  # ... below 2 % it increases, in between it holds
LOSS_INCREASE = 1.05
LOSS_DECREASE_INTERVAL = 0.300  # plus RTT: one cut per loss episode, not per report


class LossBasedControl:
    """The loss-based estimate A_s (gcc-02 §6), a cap on the delay-based one.

    Per loss window (at least ``LOSS_MIN_PACKETS`` reported packets): above 10 % lost it
    becomes (1 - 0.5 p) x the current estimate or the acknowledged rate, whichever is
    lower, at most once per 300 ms + RTT (the reports that follow a cut still describe
    the queue before it); below 2 % it grows 5 % per window, never above 1.5 x
    acknowledged + 10 kbit/s; in between it holds.

    §6 cuts A_s(i-1). Starting from the acknowledged rate when it is lower is this
    module's choice, for the same reason §5.5 cuts from R_hat rather than A_hat: a
    sender far above the path (a layer of 1.5 Mbit/s into a 700 kbit/s bucket whose
    50 ms queue overflows before the delay trend has its 20 groups) would otherwise need
    four cuts, two seconds, to fall under what the path just showed it delivers."""

    def __init__(self, *, initial_bps: float, min_bps: float, max_bps: float) -> None:
        self.min_bps, self.max_bps = min_bps, max_bps
        self.bps = min(max(initial_bps, min_bps), max_bps)
        self._last_decrease: float | None = None

    def update(
        self,
        loss: float,
        *,
        estimate_bps: float,
        acknowledged_bps: float | None,
        rtt: float,
        now: float,
    ) -> float:
        if loss > LOSS_HIGH:
            if (
                self._last_decrease is None
                or now - self._last_decrease >= LOSS_DECREASE_INTERVAL + rtt
            ):
                self._last_decrease = now
                basis = min(self.bps, estimate_bps)
                if acknowledged_bps is not None:
                    basis = min(basis, acknowledged_bps)
                self.bps = basis * (1.0 - 0.5 * loss)
        elif loss < LOSS_LOW and acknowledged_bps is not None:
            cap = MAX_INCREASE_OVER_ACKNOWLEDGED * acknowledged_bps + INCREASE_HEADROOM_BPS
            self.bps = min(self.bps * LOSS_INCREASE, max(self.bps, cap))
        self.bps = min(max(self.bps, self.min_bps), self.max_bps)
        return self.bps

    def raise_to(self, bps: float) -> None:
        self.bps = min(max(self.bps, bps), self.max_bps)
