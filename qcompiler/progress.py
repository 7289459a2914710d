"""What the driver prints and reports per stage: wall time, the process's peak resident memory after each stage and,
with `--offload-weights`, the peak anonymous memory (the weights are file pages then)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional


class StageClock:
    """`with clock("quantize", "quantizing with spqr"):` prints the message (unless quiet), times the stage and records
    the memory high-water mark at its end (after returning freed memory to the system)."""

    def __init__(self, *, quiet: bool, anon_peak=None):
        self.quiet = quiet
        self.seconds: dict[str, float] = {}
        self.peak_rss_gb: dict[str, float] = {}
        self.peak_anon_gb: dict[str, float] = {}
        self._anon = anon_peak

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    @contextlib.contextmanager
    def __call__(self, stage: str, message: Optional[str] = None) -> Iterator[None]:
        from qcompiler.models.offload import release_free_memory
        from qcompiler.models.preflight import peak_rss_gb

        if message:
            self.say(message)
        start = time.perf_counter()
        yield
        release_free_memory()
        self.seconds[stage] = time.perf_counter() - start
        self.peak_rss_gb[stage] = peak_rss_gb()
        if self._anon is not None:
            self.peak_anon_gb[stage] = self._anon.peak

    def stop(self) -> Optional[float]:
        """Print the per-stage summary; the peak anonymous memory over the export (None without offload)."""
        self.say("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        self.say("peak memory (process high-water mark after each stage): "
                 + ", ".join(f"{k} {v:.2f} GB" for k, v in self.peak_rss_gb.items()))
        if self._anon is None:
            return None
        peak = self._anon.stop()
        if peak is not None:
            self.say("peak anonymous memory (the weights are file pages: --offload-weights): "
                     + ", ".join(f"{k} {v:.2f} GB" for k, v in self.peak_anon_gb.items()))
        return peak
