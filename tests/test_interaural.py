"""The interaural transfer: labels measured on known signals, its sign, and the centring round trip."""
import torch

from engine import interaural
from engine.vae import SpectralVAE, VAEConfig, complex_multiply


def _pair(delay_samples: int, right_gain: float, seconds: float = 2.0):
    """White noise at the left ear; the right ear delayed (source on the left) and attenuated."""
    g = torch.Generator().manual_seed(0)
    n = int(seconds * 16000)
    x = torch.randn(n + 200, generator=g)
    return torch.stack([x[100:100 + n], right_gain * x[100 - delay_samples:100 - delay_samples + n]])


def test_labels_measure_itd_sign_and_ild_of_a_delayed_attenuated_ear():
    vae = SpectralVAE(VAEConfig())
    bands = interaural.band_matrix(vae.cfg)
    torch.testing.assert_close(bands.sum(0), torch.ones(vae.cfg.bins))  # a partition of unity
    params, weight = interaural.labels(vae.spectra(_pair(5, 0.5)), vae.cfg, bands)
    middle = slice(10, -10)
    itd_us = params[middle, 0] * interaural.ITD_UNIT * 1e6
    assert (itd_us - 312.5).abs().max() <= 10  # 5 samples at 16 kHz; positive = right ear later
    ild_db = params[middle, 1:] * interaural.ILD_UNIT
    assert (ild_db - 6.02).abs().max() < 0.2
    assert weight[middle].min() > 0.9  # fully coherent, never silent
    left_source, _ = interaural.labels(vae.spectra(_pair(-5, 1.0)), vae.cfg, bands)
    assert (left_source[middle, 0] * interaural.ITD_UNIT * 1e6 + 312.5).abs().max() <= 10


def test_silence_gets_a_neutral_label_and_no_weight():
    vae = SpectralVAE(VAEConfig())
    audio = _pair(5, 0.5)
    audio[:, 16000:] = 0.0
    params, weight = interaural.labels(vae.spectra(audio), vae.cfg, interaural.band_matrix(vae.cfg))
    assert (params[60:] == 0).all() and (weight[60:] == 0).all()


def test_factors_invert_and_restore_the_transfer():
    """Centring (inverse factors) then spatialising (factors) leaves spectra unchanged, and decoding a
    mono signal with the factors gives a binaural pair whose measured transfer is the one applied."""
    cfg = VAEConfig(latent_dim=2 * VAEConfig().bins)  # unfitted and full size: codes spectra losslessly
    vae = SpectralVAE(cfg)
    bands = interaural.band_matrix(cfg)
    params = torch.zeros(100, interaural.PARAMS)
    params[:, 0], params[:, 1:] = 3.0, 2.0  # 300 us, 6 dB
    forward, inverse = interaural.spectral_factors(params, cfg, bands), interaural.spectral_factors(-params, cfg, bands)
    assert forward.shape == (2, 100, 2 * cfg.bins)
    spectra = torch.randn(2, 100, 2 * cfg.bins)
    torch.testing.assert_close(complex_multiply(complex_multiply(spectra, inverse), forward), spectra,
                               atol=1e-4, rtol=1e-4)
    mono = _pair(0, 1.0)[:1].expand(2, -1)
    binaural = vae.decode(vae.encode(mono), factors=forward)
    measured, _ = interaural.labels(vae.spectra(binaural), cfg, bands)
    assert (measured[10:-10, 0] - 3.0).abs().max() <= 0.1
    assert (measured[10:-10, 1:] - 2.0).abs().max() < 0.1
