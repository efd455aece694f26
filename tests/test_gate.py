"""The silence gate (engine/gate.py): its labels, its gain, and the decoder applying it."""
import numpy as np
import pytest
import torch

from engine import gate


def test_labels_mark_the_frames_far_below_the_loudest_as_silent():
    sr, fps, frames = 16000, 25.0, 20
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((2, sr * frames // 25)) * 1e-3  # a -60 dB floor
    spf = sr // 25
    audio[:, 5 * spf:10 * spf] *= 1000.0  # loud in frames 5-9
    audio[:, 14 * spf:15 * spf] *= 100.0  # 20 dB down in frame 14: not silent
    labels = gate.silence_labels(audio, sr, fps, frames)
    expected = np.ones(frames, bool)
    expected[5:10] = False
    expected[14] = False
    np.testing.assert_array_equal(labels, expected)
    # audio shorter than the frames: the frames past its end are silent, not an error
    assert gate.silence_labels(audio[:, :12 * spf], sr, fps, frames)[12:].all()


def test_gain_is_the_floor_only_when_a_silent_source_is_surely_on_screen():
    big = 20.0
    logits = torch.tensor([[big, -big], [big, big], [-big, -big], [0.0, 0.0]])  # (on screen, sounding)
    db = gate.gain_db(logits, torch.ones(4))
    np.testing.assert_allclose(db.numpy(), [gate.FLOOR_DB, 0.0, 0.0, gate.FLOOR_DB / 4], atol=1e-3)
    assert (gate.gain_db(logits, torch.zeros(4)) == 0).all()  # a missing frame is never silenced


def test_frame_pairs_put_each_frame_after_the_one_before_or_after_itself_when_that_is_missing():
    frames = torch.arange(2 * 3, dtype=torch.uint8).reshape(2, 3, 1, 1, 1).expand(2, 3, 4, 4, 3)
    present = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    last = torch.full((2, 4, 4, 3), 200, dtype=torch.uint8)
    pairs = gate.frame_pairs(frames, present, last, torch.tensor([1.0, 0.0]))
    assert pairs.shape == (2, 3, 2, 4, 4, 3) and (pairs[:, :, 1] == frames).all()
    before = pairs[:, :, 0, 0, 0, 0].tolist()
    assert before == [[200, 0, 1], [3, 3, 5]]  # stream 1: no last frame; its frame 1 is missing


def test_waveform_gain_eases_from_one_latent_gain_to_the_next_then_holds():
    hop, sr = 320, 16000
    weights = gate.ease(hop, sr)
    ramp = round(gate.RAMP_SECONDS * sr)
    assert (torch.diff(weights) >= 0).all() and weights[0] < 0.01 and (weights[ramp:] == 1).all()
    gain = gate.waveform_gain(torch.tensor([[0.0, -40.0, -40.0, 0.0]]), weights).reshape(3, hop)
    torch.testing.assert_close(gain[0, ramp:], torch.full((hop - ramp,), 0.01))  # eased down within 5 ms
    torch.testing.assert_close(gain[1], torch.full((hop,), 0.01))  # held
    assert gain[2, 0] < 0.02 and gain[2, ramp - 1] > 0.9  # back up within 5 ms: a sharp onset


@pytest.mark.parametrize("db", [-20.0, -6.0])
def test_decoder_gates_both_ears_on_the_waveform_and_keeps_the_interaural_transfer(tiny_models, db):
    from engine.hop import DecodeStep, HopGeometry
    from engine.model import load_model

    model, _ = load_model(tiny_models["student"])
    plain = HopGeometry.of(model, hop=4)
    gated = HopGeometry(**{**plain.__dict__, "gate": True})
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 2, 4, plain.latent_dim, generator=g)
    transfer = torch.randn(1, plain.window, model.flow.cfg.transfer_params, generator=g)
    tail = torch.randn(1, 2, plain.vae_hop, generator=g)
    ref, ref_tail = DecodeStep(model, plain)(latents, transfer, tail)
    unity, unity_tail, unity_gate = DecodeStep(model, gated)(latents, transfer, torch.zeros(1, 4), tail, torch.zeros(1, 2))
    torch.testing.assert_close(unity, ref, rtol=0, atol=0)
    torch.testing.assert_close(unity_tail, ref_tail, rtol=0, atol=0)
    # the same gain on every latent, before the hop too: both ears scale exactly by it; the decoder's
    # tail stays ungated (it is gated when its block is output) and the last two gains carry over
    steady, steady_tail, steady_gate = DecodeStep(model, gated)(latents, transfer, torch.full((1, 4), db), tail,
                                                                torch.full((1, 2), db))
    torch.testing.assert_close(steady, ref * 10 ** (db / 20), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(steady_tail, ref_tail, rtol=0, atol=0)
    torch.testing.assert_close(steady_gate, torch.full((1, 2), db))
    # the gain drops at the hop's second latent: output block l (one latent behind) follows latent l - 1,
    # so blocks 0-1 pass and blocks 2-3 are gated from block 2's first 5 ms on
    step = torch.tensor([[0.0, db, db, db]])
    stepped, _, _ = DecodeStep(model, gated)(latents, transfer, step, tail, torch.zeros(1, 2))
    ratio = (stepped / ref).reshape(2, 4, plain.vae_hop)
    ramp = round(gate.RAMP_SECONDS * plain.sample_rate)
    torch.testing.assert_close(ratio[:, :2], torch.ones_like(ratio[:, :2]))
    torch.testing.assert_close(ratio[:, 2:, ramp:], torch.full_like(ratio[:, 2:, ramp:], 10 ** (db / 20)))
