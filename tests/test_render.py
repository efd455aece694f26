"""Physics of the scene engine: interaural cues, head turns, smooth motion, distance, pixels vs metadata."""
import numpy as np
import pytest
from scipy import signal

from engine.geometry import SPEED_OF_SOUND, PinholeCamera, head_relative, unit_vector
from training.hrtf import load_hrtf
from training.metrics import binaural_cues, detect_onsets
from training.render import (BLOCK_SECONDS, fractional_delay, late_reverb, render_audio, render_frames,
                             time_varying_fir)
from training.scene_spec import Room, default_listener, parse_scene
from training.sounds import KINDS

SR = 16000


def scene(sources, head=None, duration=2.0, **extra):
    obj = {"duration": duration, "sources": sources, **extra}
    if head is not None:
        obj["head"] = head
    return parse_scene(obj)


def static(kind, az, el=0.0, dist=2.0, **kw):
    return {"kind": kind, "trajectory": [{"t": 0, "azimuth": az, "elevation": el, "distance": dist}], **kw}


def median_itd(audio):
    c = binaural_cues(audio, SR)
    return float(np.median(c.itd[c.active]))


def test_source_on_the_right_is_louder_and_earlier_on_the_right():
    audio = render_audio(scene([static("noise_burst", -90.0)]))
    rms = np.sqrt(np.mean(audio ** 2, axis=1))
    assert rms[1] > 2 * rms[0]
    itd = median_itd(audio)
    assert itd < 0  # right ear leads
    # the HRTF's own ITD: the same estimator on noise through the raw measured pair at azimuth 270
    hrtf = load_hrtf("axd1", SR)
    i = hrtf.nearest(-90.0, 0.0)
    np.testing.assert_allclose(hrtf.directions[i], unit_vector(-90.0, 0.0), atol=1e-9)
    noise = np.random.default_rng(1).normal(0, 1, 2 * SR)
    own = np.stack([signal.lfilter(hrtf.raw_irs[i, ear], 1, noise) for ear in range(2)])
    assert itd == pytest.approx(median_itd(own), rel=0.10)
    assert abs(itd) > 600e-6


def test_left_right_mirror():
    left = median_itd(render_audio(scene([static("noise_burst", 60.0)])))
    right = median_itd(render_audio(scene([static("noise_burst", -60.0)])))
    assert left > 300e-6 and right < -300e-6
    assert left == pytest.approx(-right, rel=0.15)  # a real head is not exactly symmetric


def test_turning_toward_a_fixed_source_brings_itd_to_zero():
    head = [{"t": 0, "yaw": 0}, {"t": 1.0, "yaw": 60}]
    audio = render_audio(scene([static("noise_burst", 60.0)], head=head, duration=2.0))
    c = binaural_cues(audio, SR)
    start = np.median(c.itd[c.times < 0.2])
    end = np.median(c.itd[c.times > 1.2])
    assert start > 400e-6
    assert abs(end) < 40e-6
    # the ITD falls monotonically (within noise) while the head turns
    turning = c.itd[(c.times > 0.1) & (c.times < 0.9)]
    assert np.all(np.diff(signal.medfilt(turning, 5)) <= 20e-6)


def test_circling_source_has_no_discontinuities_at_block_boundaries(tmp_path):
    import soundfile as sf

    t = np.arange(4 * SR) / SR
    sf.write(tmp_path / "tone.wav", 0.3 * np.sin(2 * np.pi * 220 * t), SR)
    spec = parse_scene({"duration": 4.0, "sources": [{
        "kind": "music", "wav": "tone.wav",
        "trajectory": [{"t": 0, "azimuth": 0, "elevation": 0, "distance": 2},
                       {"t": 4, "azimuth": 360, "elevation": 0, "distance": 2}]}]}, tmp_path)
    audio = render_audio(spec)[:, SR // 2:]  # skip the start-up of the delay line
    block = int(BLOCK_SECONDS * SR)
    jump = np.abs(np.diff(audio, axis=1))
    index = np.arange(jump.shape[1]) + SR // 2
    at_boundary = (index + 1) % block == 0
    for ear in range(2):
        assert jump[ear, at_boundary].max() <= jump[ear, ~at_boundary].max()
    # and no zipper: the second difference is no rougher at boundaries than elsewhere
    rough = np.abs(np.diff(audio, 2, axis=1))[:, : at_boundary.size - 1]
    assert rough[:, at_boundary[:-1]].mean() <= 1.1 * rough[:, ~at_boundary[:-1]].mean()


def test_time_varying_fir_matches_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 300)
    block, taps = 16, 5
    filters = rng.normal(0, 1, (-(-300 // block) + 1, taps))
    y = time_varying_fir(x, filters, block)
    direct = np.zeros(300)
    for n in range(300):
        k, w = divmod(n, block)
        h = filters[k] + (filters[k + 1] - filters[k]) * w / block
        direct[n] = sum(h[j] * x[n - j] for j in range(taps) if n - j >= 0)
    np.testing.assert_allclose(y, direct, atol=1e-10)


def test_fractional_delay_is_band_limited_shift():
    t = np.arange(4000) / SR
    x = np.sin(2 * np.pi * 1000 * t)
    y = fractional_delay(x, np.full(4000, 10.37))
    np.testing.assert_allclose(y[100:-100], np.sin(2 * np.pi * 1000 * (t - 10.37 / SR))[100:-100], atol=2e-3)


def test_distance_attenuation_and_propagation_delay():
    events = [{"t": 0.5, "duration": 0.2}]
    near = render_audio(scene([static("impact", 0.0, dist=2.0, events=events)]))
    far = render_audio(scene([static("impact", 0.0, dist=4.0 + 3.43, events=events)]))
    far_same = render_audio(scene([static("impact", 0.0, dist=4.0, events=events)]))
    ratio = np.sqrt(np.sum(near ** 2) / np.sum(far_same ** 2))
    assert ratio == pytest.approx(2.0, rel=0.02)  # 1/r: -6 dB per doubling
    lag = detect_onsets(far, SR)[0] - detect_onsets(far_same, SR)[0]
    assert lag == pytest.approx(3.43 / SPEED_OF_SOUND, abs=0.002)  # 10 ms more path


def test_room_adds_reflections_and_a_decaying_tail():
    events = [{"t": 0.2, "duration": 0.1}]
    dry = render_audio(scene([static("impact", 30.0, events=events)], duration=1.5))
    wet = render_audio(scene([static("impact", 30.0, events=events)], duration=1.5,
                             room={"size": [6, 5, 3], "rt60": 0.5}))
    after = slice(int(0.6 * SR), int(1.0 * SR))
    assert np.sum(wet[:, after] ** 2) > 100 * np.sum(dry[:, after] ** 2)
    # the tail decays 60 dB per rt60: from 0.4 s to 0.7 s, 36 dB
    e1 = np.sum(wet[:, int(0.35 * SR):int(0.45 * SR)] ** 2)
    e2 = np.sum(wet[:, int(0.65 * SR):int(0.75 * SR)] ** 2)
    assert 10 * np.log10(e1 / e2) == pytest.approx(36.0, abs=6.0)


def test_another_tail_draw_changes_only_the_late_tail():
    """The eval's floor (training.evaluate.another_tail): another draw of a room's tail changes the
    sound after the tail starts and nothing before; an anechoic scene has no tail to draw."""
    source = static("impact", 30.0, events=[{"t": 0.2, "duration": 0.1}])
    wet = scene([source], duration=1.0, room={"size": [6, 5, 3], "rt60": 0.5})
    first, again, second = render_audio(wet), render_audio(wet, tail_draw=0), render_audio(wet, tail_draw=1)
    assert np.array_equal(first, again)
    before_tail = int((0.2 + 0.02) * SR)  # the tail starts 20 ms after the sound (the mixing time)
    assert np.abs(first[:, :before_tail] - second[:, :before_tail]).max() < 1e-6 * np.abs(first).max()
    # independent draws: any two are equally far apart, and a tail is a large part of a room's sound
    third = render_audio(wet, tail_draw=2)
    apart = np.sum((first - second) ** 2)
    assert apart == pytest.approx(np.sum((second - third) ** 2), rel=0.3)
    assert apart > 0.2 * np.sum(first ** 2)
    dry = scene([source], duration=1.0)
    assert np.array_equal(render_audio(dry), render_audio(dry, tail_draw=1))


def test_late_reverb_keeps_the_diffuse_field_coherence_of_the_measured_head():
    """A diffuse field reaches the ears coherent at low frequencies (the head is small against the
    wavelength) and incoherent at high ones; independent noise per ear would be incoherent everywhere."""
    room = Room((6.0, 5.0, 3.0), (3.0, 2.5, 1.5), 0.5)
    noise = np.random.default_rng(0).normal(0, 1, 12 * SR)
    wet = late_reverb(noise, room, load_hrtf("axd1", SR), np.random.default_rng(1))[:, SR:]
    freqs, coherence = signal.coherence(wet[0], wet[1], fs=SR, nperseg=512)
    assert coherence[(freqs > 50) & (freqs < 300)].mean() > 0.5
    assert coherence[freqs > 2000].mean() < 0.3


def test_a_room_is_drawn_around_the_listener_where_its_edges_are():
    """Room 8 x 6 x 3 m, listener centred at 1.5 m, looking along +x: the front wall is 4 m ahead, the side
    walls 3 m away, so its corners are at azimuth +-atan(3/4) and its top and bottom edges at +-atan(1.5/4)."""
    room = {"size": [8, 6, 3], "rt60": 0.4, "listener": [4, 3, 1.5]}
    frames, _, _ = render_frames(scene([static("speech", 180.0)], duration=0.04, room=room))
    outdoors, _, _ = render_frames(scene([static("speech", 180.0)], duration=0.04))
    img = frames[0].astype(int)
    assert np.abs(img - outdoors[0].astype(int)).mean() > 20  # no sky, no ground: walls
    cam = PinholeCamera(128, 128, 90.0)

    def dark(pixels):
        return pixels.sum(axis=-1) < 200

    for v in (64 - cam.focal * 1.5 / 4, 64 + cam.focal * 1.5 / 4):  # ceiling and floor edges, centre column
        rows = np.nonzero(dark(img[:, 60:68]).all(axis=1))[0] + 0.5
        assert np.min(np.abs(rows - v)) <= 1.0
    for u in (64 - cam.focal * 0.75, 64 + cam.focal * 0.75):  # vertical corners, middle rows
        cols = np.nonzero(dark(img[56:72]).all(axis=0))[0] + 0.5
        assert np.min(np.abs(cols - u)) <= 1.0
    assert default_listener([8, 6, 3]) == [4, 3, 1.5]


def test_random_room_scenes_keep_their_sources_inside_the_room():
    from training.sampler import random_scene
    from training.render import source_positions

    checked = 0
    for seed in range(1_000_000, 1_000_600):  # 5% of room scenes left the room before the clamp
        obj = random_scene(seed)
        if "room" not in obj:
            continue
        spec = parse_scene(obj)
        times = np.linspace(0, spec.duration, 81)
        for src in spec.sources:
            absolute = source_positions(src, times) + np.array(spec.room.listener)
            assert np.all(absolute > 0) and np.all(absolute < np.array(spec.room.size)), seed
        checked += 1
    assert checked > 150


def test_drawn_position_matches_metadata():
    spec = scene([static("speech", 25.0, el=5.0, dist=3.0)], head=[{"t": 0, "yaw": 5.0, "pitch": -3.0}],
                 duration=0.2)
    frames, pose, meta = render_frames(spec)
    color = np.array(KINDS["speech"].look.color)
    # the source flashes at t = 0 (continuous sound starts); take a later frame
    f = len(frames) - 1
    src = meta[f]["sources"][0]
    az, el = head_relative(25.0, 5.0, 5.0, -3.0, 0.0)
    assert src["visible"]
    assert (src["azimuth"], src["elevation"]) == (pytest.approx(az, abs=1e-3), pytest.approx(el, abs=1e-3))
    assert el == pytest.approx(8.0, abs=0.5)  # nose 3 degrees down: the source appears 3 degrees higher
    mask = np.all(np.abs(frames[f].astype(int) - color) <= 3, axis=-1)
    rows, cols = np.nonzero(mask)
    assert len(rows) > 20
    cam = PinholeCamera(128, 128, 90.0)
    expected_u = 64 - cam.focal * np.tan(np.radians(src["azimuth"]))
    assert cols.mean() + 0.5 == pytest.approx(expected_u, abs=1.0)
    assert cols.mean() + 0.5 == pytest.approx(src["u"], abs=1.0)
    assert rows.mean() + 0.5 == pytest.approx(src["v"], abs=1.0)


def test_offscreen_and_behind_sources_are_not_drawn():
    spec = scene([static("speech", 170.0), static("bell", 0.0, visible=False)], duration=0.2)
    frames, _, meta = render_frames(spec)
    assert not meta[-1]["sources"][0]["visible"] and not meta[-1]["sources"][1]["visible"]
    background = render_frames(scene([static("speech", 170.0, visible=False)], duration=0.2))[0]
    np.testing.assert_array_equal(frames, background)


def test_nearer_source_occludes_farther():
    spec = scene([static("speech", 0.0, dist=6.0), static("impact", 0.0, dist=2.0)], duration=0.2)
    frames, _, _ = render_frames(spec)
    centre = frames[-1][64, 64].astype(int)
    impact = np.array(KINDS["impact"].look.color)
    assert np.all(np.abs(centre - impact) <= 3)


def test_sound_kinds_differ_and_are_deterministic():
    from training.sounds import synthesize

    spectra = {}
    for name in KINDS:
        a = synthesize(name, SR, SR, np.random.default_rng(3))
        b = synthesize(name, SR, SR, np.random.default_rng(3))
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all() and np.sqrt(np.mean(a ** 2)) == pytest.approx(0.05, rel=1e-6)
        p = np.abs(np.fft.rfft(a, 4096)) ** 2
        spectra[name] = p / p.sum()
    names = list(spectra)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            # total-variation distance between normalised spectra: every pair is clearly different
            assert 0.5 * np.abs(spectra[a] - spectra[b]).sum() > 0.2, (a, b)


def test_random_scenes_parse_even_when_a_keyframe_falls_a_millisecond_short_of_the_end():
    import pickle

    from training.sampler import random_scene
    from training.scene_spec import SceneSpecError, parse_scene

    # these seeds drew a last head segment ending < 1 ms before the clip's end: two keyframes rounded to 8.0 s
    for seed in (2287, 4267, 10232, 15304):
        times = [k["t"] for k in parse_scene(random_scene(seed)).to_json()["head"]]
        assert all(b > a for a, b in zip(times, times[1:])) and times[-1] == 8.0
    # and these a moving source's (seed 1001305 stopped `visaudio cache` at its worker)
    for seed in (1001305, 1001702, 1001877):
        for source in parse_scene(random_scene(seed)).to_json()["sources"]:
            times = [k["t"] for k in source["trajectory"]]
            assert all(b > a for a, b in zip(times, times[1:])) and times[-1] <= 8.0
    # the error crosses a process boundary whole (a worker's exception is pickled back to the parent)
    error = pickle.loads(pickle.dumps(SceneSpecError("sources[1].t", "keyframes out of order")))
    assert (error.field, str(error)) == ("sources[1].t", "sources[1].t: keyframes out of order")
