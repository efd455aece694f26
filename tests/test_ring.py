"""The output ring: wrap-around, zero-fill and counting on underflow, refusal on overflow."""
import numpy as np

from realtime.ring import AudioRing


def test_ring_round_trips_across_the_wrap_and_counts_underflows():
    ring = AudioRing(10)
    signal = np.arange(40, dtype=np.float32).reshape(20, 2)
    out = np.empty((4, 2), np.float32)
    assert ring.write(signal[:8])
    ring.read_into(out)
    np.testing.assert_array_equal(out, signal[:4])
    assert ring.write(signal[8:14])  # wraps
    assert not ring.write(signal[14:20])  # 10 in the ring already: refused, counted
    assert ring.overflows == 1
    for k in (4, 8):
        ring.read_into(out)
        np.testing.assert_array_equal(out, signal[k:k + 4])
    ring.read_into(out)  # only 2 left: 2 real samples, 2 zeros
    np.testing.assert_array_equal(out[:2], signal[12:14])
    assert not out[2:].any() and ring.underflows == 1 and ring.missing == 2
    assert ring.write(signal[14:18])  # continues after the zero-filled gap, not before it
    ring.read_into(out)
    np.testing.assert_array_equal(out, signal[14:18])
