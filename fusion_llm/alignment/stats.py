"""Counters of the alignment's safety nets (:class:`AlignmentStats`) and the process-wide :data:`ALIGNMENT_STATS`
that a function updates when it gets no ``stats`` argument."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class AlignmentStats:
    """Counters of the alignment's safety nets (per process: ``datasets.map(num_proc=k)``
    keeps one per worker).

    Attributes:
        examples: (example, source) pairs aligned.
        anchor_positions: anchor positions aligned.
        nothing_positions: positions with no settled source token (index ``-1``).
        crossing_fallbacks: claimed hard boundaries that a full-text source token crossed
            (the boundary was dropped; should stay 0).
        verified_positions: positions checked against a re-tokenized prefix (``verify=True``).
        verify_failures: verified positions whose prefix tokens disagreed (fell back; should
            stay 0).
        failures_by_source: ``crossing_fallbacks + verify_failures`` per source tokenizer name.
        window_fallbacks: unsettled tails re-tokenized from the whole prefix because the window's tokens
            did not tile the tail (overlapping offsets of byte pieces of one character, added tokens);
            exact either way, only slower.
    """

    examples: int = 0
    anchor_positions: int = 0
    nothing_positions: int = 0
    crossing_fallbacks: int = 0
    verified_positions: int = 0
    verify_failures: int = 0
    failures_by_source: Counter = field(default_factory=Counter)
    window_fallbacks: int = 0

    def reset(self) -> None:
        """Zero every counter."""
        self.__init__()

    def as_dict(self) -> dict:
        """The counters as a plain dict (for logs and JSON)."""
        d = {k: getattr(self, k) for k in ("examples", "anchor_positions", "nothing_positions",
                                            "crossing_fallbacks", "verified_positions", "verify_failures",
                                            "window_fallbacks")}
        d["failures_by_source"] = dict(self.failures_by_source)
        return d


#: Process-wide counters used when a function gets no ``stats`` argument.
ALIGNMENT_STATS = AlignmentStats()
