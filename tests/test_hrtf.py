import numpy as np
import pytest

from engine.geometry import unit_vector
from training.hrtf import HrtfError, load_hrtf


@pytest.fixture(scope="module")
def hrtf():
    return load_hrtf("axd1", 16000)


def test_measured_set_shape(hrtf):
    assert hrtf.filters.shape == (793, 2, 72) and hrtf.onsets.shape == (793, 2)
    assert hrtf.measured_distance == pytest.approx(1.5)
    # onset alignment + the 4 ms cut keep each response's energy (a fractional shift of a band-limited
    # response preserves it; aliasing near Nyquist would not)
    raw = np.sum(hrtf.raw_irs ** 2, axis=-1)
    lost = raw - np.sum(hrtf.filters ** 2, axis=-1)
    assert np.max(np.abs(lost) / raw) < 0.01


def test_lookup_at_a_measured_direction_is_that_measurement(hrtf):
    i = hrtf.nearest(-30.0, 10.0)
    filters, onsets = hrtf.lookup([-30.0], [10.0])
    np.testing.assert_allclose(filters[0], hrtf.filters[i], atol=1e-9)
    np.testing.assert_allclose(onsets[0], hrtf.onsets[i], atol=1e-12)


def test_interpolation_is_a_convex_blend_of_neighbours(hrtf):
    rng = np.random.default_rng(0)
    az, el = rng.uniform(-180, 180, 200), rng.uniform(-40, 85, 200)
    idx, w = hrtf.weights(unit_vector(az, el))
    assert np.all(w >= 0) and np.allclose(w.sum(axis=1), 1)
    # the blended directions point where we asked (inside a small spherical triangle)
    blended = np.einsum("qk,qkd->qd", w, hrtf.directions[idx])
    blended /= np.linalg.norm(blended, axis=1, keepdims=True)
    angle = np.degrees(np.arccos(np.clip(np.sum(blended * unit_vector(az, el), axis=1), -1, 1)))
    assert angle.max() < 0.01


def test_onset_itd_sign_and_size(hrtf):
    left = hrtf.onsets[hrtf.nearest(90, 0)]
    right = hrtf.onsets[hrtf.nearest(-90, 0)]
    assert left[1] - left[0] == pytest.approx(0.00069, abs=0.00005)  # right ear ~0.69 ms later
    assert right[0] - right[1] == pytest.approx(0.00069, abs=0.00005)


def test_missing_sofa_is_a_clear_error(tmp_path):
    with pytest.raises(HrtfError, match="not found"):
        load_hrtf(str(tmp_path / "nope.sofa"), 16000)
    bad = tmp_path / "bad.sofa"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(HrtfError, match="bad.sofa"):
        load_hrtf(str(bad), 16000)
