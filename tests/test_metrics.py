"""Metrics on signals whose answers are known."""
import numpy as np
import pytest
from scipy import signal

from engine.geometry import woodworth_itd
from training import metrics
from training.render import fractional_delay

SR = 16000


def noise(seconds=2.0, seed=0):
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * SR))


def test_stft_distance_definition():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (2, 8000))
    assert metrics.stft_distance(ref, ref) == 0.0
    # scaling: est = (1 + g) ref -> distance = g^2 * (mean of squared real/imag parts of the reference)
    spec = metrics.stft(ref)
    base = sum(np.mean(np.concatenate([spec[e].real, spec[e].imag]) ** 2) for e in range(2))
    assert metrics.stft_distance(ref, 1.5 * ref) == pytest.approx(0.25 * base)
    # frame geometry of librosa's centred STFT: 1 + N // hop frames, n_fft / 2 + 1 bins
    assert spec.shape == (2, 257, 1 + 8000 // 160)
    # a single frame matches a hand-made windowed FFT
    window = np.zeros(512)
    window[56:456] = np.hanning(401)[:400]  # periodic Hann of 400 centred in 512
    padded = np.pad(ref[0], 256)
    np.testing.assert_allclose(spec[0, :, 10], np.fft.rfft(padded[1600:2112] * window), atol=1e-9)


def test_envelope_distance_known_amplitude():
    t = np.arange(SR) / SR
    carrier = np.sin(2 * np.pi * 1000 * t)
    ref = np.stack([carrier, carrier])
    assert metrics.envelope_distance(ref, ref) == 0.0
    assert metrics.envelope_distance(ref, 0.5 * ref) == pytest.approx(1.0, abs=0.01)  # 0.5 per ear


@pytest.mark.parametrize("itd_us", [-600.0, -250.0, 0.0, 120.0, 433.0])
def test_gcc_phat_recovers_fractional_itd(itd_us):
    x = noise()
    left = fractional_delay(x, np.full(len(x), 20.0))
    right = fractional_delay(x, np.full(len(x), 20.0 + itd_us * 1e-6 * SR))  # right lags by the ITD
    cues = metrics.binaural_cues(np.stack([left, right]), SR)
    assert np.median(cues.itd[cues.active]) * 1e6 == pytest.approx(itd_us, abs=5.0)


def test_ild_and_coherence():
    x = noise()
    cues = metrics.binaural_cues(np.stack([x, 0.5 * x]), SR)
    np.testing.assert_allclose(cues.ild[cues.active], 20 * np.log10(2), atol=1e-6)
    assert np.all(cues.coherence[cues.active] > 0.999)
    independent = metrics.binaural_cues(np.stack([x, noise(seed=1)]), SR)
    assert np.median(independent.coherence) < 0.25


def test_cue_errors_measure_known_differences():
    x = noise()
    ref = np.stack([x, fractional_delay(x, np.full(len(x), 3.2))])  # 200 us
    est = np.stack([x, 0.5 * fractional_delay(x, np.full(len(x), 1.6))])  # 100 us, 6 dB
    out = metrics.compare(ref, est, SR)
    assert out["itd_error_us"] == pytest.approx(100.0, abs=6.0)
    assert out["ild_error_db"] == pytest.approx(6.02, abs=0.3)
    assert out["ic_error"] < 0.03  # both near 1; frame edges cost a little coherence
    same = metrics.compare(ref, ref, SR)
    assert same["itd_error_us"] == 0 and same["ild_error_db"] == 0 and same["stft_distance"] == 0


def test_direction_from_woodworth_itd():
    x = noise()
    for lateral in (-70.0, -20.0, 35.0, 80.0):
        itd = woodworth_itd(lateral, metrics.HEAD_RADIUS)
        right = fractional_delay(x, np.full(len(x), 10 + itd * SR))
        left = fractional_delay(x, np.full(len(x), 10.0))
        gain = 10 ** (np.sign(lateral) * 3 / 20)  # a consistent ILD
        cues = metrics.binaural_cues(np.stack([gain * left, right / gain]), SR)
        est, agrees = metrics.lateral_from_cues(cues)
        assert np.median(est[cues.active]) == pytest.approx(lateral, abs=1.5)
        assert agrees[cues.active].all()
    # an ILD that contradicts the ITD is flagged
    itd = woodworth_itd(40.0, metrics.HEAD_RADIUS)
    bad = np.stack([0.3 * x, fractional_delay(x, np.full(len(x), itd * SR))])
    _, agrees = metrics.lateral_from_cues(metrics.binaural_cues(bad, SR))
    assert not agrees.any()


def test_head_radius_fits_hrtf():
    """HEAD_RADIUS is the least-squares Woodworth fit of our low-band ITD on the shipped HRTF."""
    from scipy.optimize import minimize_scalar

    from training.hrtf import load_hrtf

    hrtf = load_hrtf("axd1", SR)
    x = noise(1.0)
    lateral, itds = [], []
    for az in range(-90, 91, 15):
        i = hrtf.nearest(az, 0.0)
        pair = np.stack([signal.lfilter(hrtf.raw_irs[i, e], 1, x) for e in range(2)])
        cues = metrics.binaural_cues(pair, SR)
        lateral.append(az)
        itds.append(np.median(cues.itd[cues.active]))
    from engine.geometry import woodworth_lateral
    fit = minimize_scalar(lambda r: np.sum((woodworth_lateral(np.array(itds), r) - lateral) ** 2),
                          bounds=(0.07, 0.15), method="bounded").x
    assert fit == pytest.approx(metrics.HEAD_RADIUS, rel=0.05)


def test_onsets_at_known_times():
    x = 0.001 * noise(3.0)
    times = [0.3, 0.9, 1.45, 2.2]
    for t in times:
        start = int(t * SR)
        x[start:start + 1600] += np.sin(2 * np.pi * 800 * np.arange(1600) / SR) * np.exp(-np.arange(1600) / 400)
    found = metrics.detect_onsets(np.stack([x, x]), SR)
    assert len(found) == len(times)
    np.testing.assert_allclose(found, times, atol=0.003)


def test_onset_sync_against_meta():
    x = 0.001 * noise(3.0)
    for t in (0.5, 1.5):
        start = int(t * SR)
        x[start:start + 800] += np.exp(-np.arange(800) / 200) * np.sin(np.arange(800))
    meta = {"fps": 25.0, "scene": {"sources": [{"events": [{"t": 0.5, "duration": 0.2}, {"t": 1.5, "duration": 0.2},
                                                           {"t": 2.5, "duration": 0.2}]}]},
            "frames": [{"t": f / 25, "sources": [{"azimuth": 0, "elevation": 0, "active": True,
                                                   "visible": f < 60}]} for f in range(75)]}
    out = metrics.onset_sync(np.stack([x, x]), SR, meta)
    assert out["events"] == 2  # the third event is off screen
    assert out["within_40ms"] == 1.0 and out["median_abs_error_ms"] < 3
    late = np.roll(x, int(0.1 * SR))
    assert metrics.onset_sync(np.stack([late, late]), SR, meta)["within_40ms"] == 0.0


def test_onset_frames_pick_the_one_frame_that_opens_on_each_visible_event():
    meta = {"fps": 25.0, "scene": {"sources": [{"events": [{"t": 0.5, "duration": 0.2}, {"t": 1.513, "duration": 0.2},
                                                           {"t": 2.5, "duration": 0.2}]}]},
            "frames": [{"t": f / 25, "sources": [{"azimuth": 0, "elevation": 0, "active": True,
                                                   "visible": f < 60}]} for f in range(75)]}
    cues = metrics.binaural_cues(noise(3.0)[None].repeat(2, axis=0), SR)
    mask = metrics.onset_frames(cues.times, meta)
    starts = cues.times[mask] - metrics.FRAME_SECONDS / 2
    # one frame per on-screen event (the third is off screen), starting within a hop before its onset
    assert len(starts) == 2
    for start, onset in zip(starts, (0.5, 1.513)):
        assert onset - metrics.HOP_SECONDS < start <= onset + 1e-9


@pytest.mark.slow
def test_in_a_room_the_onset_frames_cues_are_the_scenes_not_the_tails_noise():
    """The precedence effect in the scene engine: a room's first wavefront carries the direct path's cues,
    so a second draw of the late tail's noise moves the cues of the onset frames far less than those of
    the frames after them. (A tail that started before the direct sound, or drowned it, would fail.)"""
    from training.render import render_audio
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    onset_pairs, all_pairs = [], []
    for seed in (1, 5, 6):  # a noise burst, speech and a bell, each in a room, with their own events
        scene = random_scene(seed, duration=4.0, num_sources=1, room=True)
        spec = parse_scene(scene)
        ref, other = render_audio(spec), render_audio(spec, tail_draw=1)
        a, b = metrics.binaural_cues(ref, spec.sample_rate), metrics.binaural_cues(other, spec.sample_rate)
        meta = {"fps": spec.fps, "scene": scene,
                "frames": [{"t": f / spec.fps, "sources": [{"azimuth": 0, "elevation": 0, "active": True, "visible": True}]}
                           for f in range(int(4.0 * spec.fps))]}
        onset_pairs.append(metrics.errors_from_cues(a, b, metrics.onset_frames(a.times, meta)))
        all_pairs.append(metrics.errors_from_cues(a, b))
    at_onsets = {k: np.mean([e[k] for e in onset_pairs]) for k in ("itd_error_us", "ild_error_db", "frames")}
    everywhere = {k: np.mean([e[k] for e in all_pairs]) for k in ("itd_error_us", "ild_error_db")}
    assert at_onsets["frames"] >= 2
    assert at_onsets["itd_error_us"] < 0.5 * everywhere["itd_error_us"]
    assert at_onsets["ild_error_db"] < 0.5 * everywhere["ild_error_db"]


def test_metrics_cli(clip_dir, tmp_path, capsys):
    import json

    import soundfile as sf

    from visaudio.cli import main

    ref = clip_dir / "binaural.wav"
    data, sr = sf.read(ref)
    sf.write(tmp_path / "swapped.wav", data[:, ::-1], sr)
    assert main(["metrics", str(ref), str(ref), "--meta", str(clip_dir / "meta.json"), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["reference"]["itd_error_us"] == 0.0
    assert main(["metrics", str(ref), str(tmp_path / "swapped.wav"), "--json"]) == 0
    swapped = json.loads(capsys.readouterr().out)
    assert swapped["reference"]["ild_error_db"] > 1.0
    sf.write(tmp_path / "mono.wav", data[:, 0], sr)
    assert main(["metrics", str(ref), str(tmp_path / "mono.wav")]) == 2
    assert "mono.wav" in capsys.readouterr().err


def test_direction_ignores_incoherent_frames():
    """Frames where independent (reverberant) sound dominates are not scored."""
    x = noise(2.0)
    itd = woodworth_itd(50.0, metrics.HEAD_RADIUS)
    pair = np.stack([fractional_delay(x, np.full(len(x), 10.0)), fractional_delay(x, np.full(len(x), 10 + itd * SR))])
    diffuse = np.random.default_rng(5).normal(0, 0.3, pair.shape)
    pair[:, SR:] = 0.1 * pair[:, SR:] + diffuse[:, SR:]  # second half: a diffuse field 20 dB above the source
    meta = {"fps": 25.0, "frames": [{"t": f / 25, "sources": [{"azimuth": 50.0, "elevation": 0.0, "active": True,
                                                                "visible": True}]} for f in range(50)]}
    out = metrics.direction_error(pair, SR, meta)
    assert out["median_deg"] < 2.0
    assert 0.35 < out["coverage"] < 0.65
    assert metrics.direction_error(pair, SR, meta, min_coherence=0.0)["mean_deg"] > 5.0


def test_dominant_source_from_levels():
    def frame(levels, active=(True, True)):
        return {"t": 0.0, "sources": [{"azimuth": 0.0, "elevation": 0.0, "visible": True, "active": a, "level_db": lv}
                            for lv, a in zip(levels, active)]}
    meta = {"frames": [frame((-20, -30)), frame((-20, -24)), frame((-40, -20)), frame((-10, -60), (False, True)),
                       frame((-30, -30), (False, False))]}
    which, dominated = metrics.dominant_source(meta)
    assert dominated.tolist() == [True, False, True, True, False]
    assert which[:4].tolist() == [0, 0, 1, 1]


def test_cue_errors_on_a_subset_of_frames():
    """The in-view scoring: only the masked frames count, and a mask with nothing sounding is refused."""
    x = noise()
    ref = np.stack([x, fractional_delay(x, np.full(len(x), 3.2))])
    est = ref.copy()
    half = len(x) // 2
    est[1, half:] = fractional_delay(x, np.full(len(x), 1.6))[half:]  # wrong ITD in the second half only
    frames = len(metrics.binaural_cues(ref, SR).times)
    first = np.arange(frames) < frames // 2 - 2
    assert metrics.cue_errors(ref, est, SR, first)["itd_error_us"] == 0
    assert metrics.cue_errors(ref, est, SR, ~first)["itd_error_us"] > 50
    assert metrics.cue_errors(ref, est, SR, first)["frames"] == first.sum()
    with pytest.raises(ValueError, match="silent"):
        metrics.cue_errors(ref, est, SR, np.zeros(frames, bool))


def test_cue_errors_can_keep_only_coherent_reference_frames():
    x, y = noise(seed=1), noise(seed=2)
    ref = np.stack([x, fractional_delay(x, np.full(len(x), 3.2))])
    half = len(x) // 2
    ref[1, half:] = y[half:]  # the second half: the ears unrelated, as in a late reverb tail
    est = np.stack([x, x])  # no ITD anywhere
    all_frames = metrics.cue_errors(ref, est, SR)
    direct = metrics.cue_errors(ref, est, SR, min_reference_coherence=metrics.DIRECTION_MIN_COHERENCE)
    assert direct["frames"] < all_frames["frames"] * 0.6
    assert direct["itd_error_us"] == pytest.approx(200.0, abs=8.0)  # only the frames with an ITD to get wrong
