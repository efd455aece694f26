"""The per-ear spectral VAE: perfect-reconstruction framing, causality, streaming == whole, the fit."""
import numpy as np
import pytest
import torch

from engine.vae import SpectralVAE, VAEConfig
from training.train_vae import TrainVAEConfig, fit_vae, load_vae, save_vae

TINY = VAEConfig(hop=40, latent_dim=82, itd_band_weight=1.0)  # 82 = 2 * 41 bins: a complete basis, so decoding is exact


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_full_basis_reconstructs_exactly_one_hop_late():
    vae = SpectralVAE(TINY)
    audio = torch.randn(3, 2, 40 * 12)
    z = vae.encode(audio)
    assert z.shape == (3, 2, 82, 12)
    decoded = vae.decode(z)
    assert decoded.shape == audio.shape
    # sample n of the decoder output is signal time n - hop
    torch.testing.assert_close(decoded[..., 40:], audio[..., :-40], atol=1e-4, rtol=0)
    torch.testing.assert_close(vae.reconstruct(audio)[..., :-40], audio[..., :-40], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="multiple of the VAE hop"):
        vae.encode(audio[..., :-1])


def test_streaming_encode_and_decode_equal_whole():
    torch.manual_seed(1)
    vae = SpectralVAE(TINY)
    audio = torch.randn(2, 40 * 23)
    whole_z = vae.encode(audio)
    enc = vae.init_encoder(2)
    bounds = [(0, 1), (1, 5), (5, 6), (6, 23)]
    z = torch.cat([vae.encode(audio[:, a * 40:b * 40], enc) for a, b in bounds], -1)
    torch.testing.assert_close(z, whole_z, atol=1e-5, rtol=0)
    dec = vae.init_decoder(2)
    parts = torch.cat([vae.decode(z[..., a:b], dec) for a, b in bounds], -1)
    assert (parts - vae.decode(whole_z)).abs().max() < 1e-5
    dec.reset()  # a reset stream repeats the output from the start
    torch.testing.assert_close(vae.decode(z[..., :3], dec), parts[..., :120])


def test_encoder_and_decoder_are_causal():
    vae = SpectralVAE(TINY)
    audio = torch.randn(1, 40 * 10)
    later = audio.clone()
    later[:, 6 * 40:] += 1.0  # change samples from hop 6 on
    # latent l sees samples up to (l + 1) * hop: latents 0..4 unchanged
    torch.testing.assert_close(vae.encode(later)[..., :5], vae.encode(audio)[..., :5])
    z = vae.encode(audio)
    z2 = z.clone()
    z2[..., 7:] = 0.0
    # decoder output hop l depends on latents <= l
    torch.testing.assert_close(vae.decode(z2)[..., :7 * 40], vae.decode(z)[..., :7 * 40])


def test_fit_keeps_interaural_cues_and_round_trips_checkpoint(tmp_path):
    from training.metrics import compare
    from training.render import render_audio
    from training.scene_spec import parse_scene

    vae = fit_vae(TrainVAEConfig(clips=3), progress=False)
    assert 0.3 < vae.explained_variance < 1.0
    scene = {"duration": 2.0, "seed": 3, "head": [{"t": 0, "yaw": 0, "pitch": 0, "roll": 0}],
             "sources": [{"kind": "speech", "trajectory": [{"t": 0, "azimuth": 50, "elevation": 0, "distance": 2}]}]}
    audio = render_audio(parse_scene(scene)).astype(np.float32)
    recon = vae.reconstruct(torch.from_numpy(audio)).numpy()
    m = compare(audio, recon, 16000)
    assert m["itd_error_us_median"] < 40 and m["ild_error_db"] < 2.5, m  # a 3-clip fit; the full fit: ~1.1 dB
    path = save_vae(tmp_path / "vae.safetensors", vae)
    again, _ = load_vae(path)
    torch.testing.assert_close(again.encode(torch.from_numpy(audio)), vae.encode(torch.from_numpy(audio)))
    std = vae.encode(torch.from_numpy(audio)).std()  # whitened latents: about unit scale
    assert 0.1 < float(std) < 3.0
