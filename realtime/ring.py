"""A preallocated single-producer/single-consumer audio ring (python-rtmixer's pattern).

The producer (the scheduler) writes blocks; the consumer (the sound card's callback) only copies out,
zero-fills what is missing and counts it as an underflow: nothing in `read_into` allocates, locks,
logs or blocks. Positions are monotonic sample counters; each side writes only its own counter, so
with one producer and one consumer no lock is needed.
"""
from __future__ import annotations

import numpy as np


class AudioRing:
    def __init__(self, capacity: int, channels: int = 2):
        self.buffer = np.zeros((capacity, channels), np.float32)
        self.capacity = capacity
        self.written = 0  # samples ever written (producer's counter)
        self.read = 0  # samples ever read, including zero-filled ones (consumer's counter)
        self.underflows = 0  # callbacks that found too little audio
        self.missing = 0  # samples zero-filled
        self.overflows = 0  # writes refused for lack of room

    @property
    def available(self) -> int:
        return max(0, self.written - self.read)

    @property
    def room(self) -> int:
        return self.capacity - self.available

    def write(self, block: np.ndarray) -> bool:
        """Append (n, channels) samples; refuses (and counts) a block that does not fit."""
        n = len(block)
        if self.written < self.read:  # the consumer zero-filled past our end: continue from its position
            self.written = self.read
        if n > self.room:
            self.overflows += 1
            return False
        start = self.written % self.capacity
        first = min(n, self.capacity - start)
        self.buffer[start:start + first] = block[:first]
        self.buffer[:n - first] = block[first:]
        self.written += n
        return True

    def read_into(self, out: np.ndarray) -> None:
        """Fill `out` (n, channels) from the ring; zero-fill and count what is not there."""
        n = len(out)
        have = min(n, self.available)
        start = self.read % self.capacity
        first = min(have, self.capacity - start)
        out[:first] = self.buffer[start:start + first]
        out[first:have] = self.buffer[:have - first]
        if have < n:
            out[have:] = 0.0
            self.underflows += 1
            self.missing += n - have
        self.read += n
