"""The interaural transfer: labels measured on known signals, its sign, and the centring round trip."""
import pytest
import torch

from engine import interaural
from engine.vae import SpectralVAE, VAEConfig, complex_multiply


def _pair(delay_samples: int, right_gain: float, seconds: float = 2.0):
    """White noise at the left ear; the right ear delayed (source on the left) and attenuated."""
    g = torch.Generator().manual_seed(0)
    n = int(seconds * 16000)
    x = torch.randn(n + 200, generator=g)
    return torch.stack([x[100:100 + n], right_gain * x[100 - delay_samples:100 - delay_samples + n]])


BAND_SETS = pytest.mark.parametrize("centres", [interaural.OCTAVE_ILD_BANDS_HZ, interaural.THIRD_OCTAVE_ILD_BANDS_HZ],
                                    ids=["octave", "third-octave"])


@BAND_SETS
def test_labels_measure_itd_sign_and_ild_of_a_delayed_attenuated_ear(centres):
    vae = SpectralVAE(VAEConfig())
    bands = interaural.band_matrix(vae.cfg, centres)
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
    bands = interaural.band_matrix(vae.cfg, interaural.OCTAVE_ILD_BANDS_HZ)
    params, weight = interaural.labels(vae.spectra(audio), vae.cfg, bands)
    assert (params[60:] == 0).all() and (weight[60:] == 0).all()


@BAND_SETS
def test_factors_invert_and_restore_the_transfer(centres):
    """Centring (inverse factors) then spatialising (factors) leaves spectra unchanged, and decoding a
    mono signal with the factors gives a binaural pair whose measured transfer is the one applied."""
    cfg = VAEConfig(latent_dim=2 * VAEConfig().bins)  # unfitted and full size: codes spectra losslessly
    vae = SpectralVAE(cfg)
    bands = interaural.band_matrix(cfg, centres)
    params = torch.zeros(100, interaural.transfer_params(centres))
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


def _lateral_table():
    """A synthetic direction table: ITD = lateral angle / 10 units, ILDs = 2 sin(azimuth)."""
    az = torch.linspace(-180.0, 180.0, interaural.TABLE_AZIMUTHS)
    table = torch.zeros(interaural.TABLE_AZIMUTHS, interaural.transfer_params(interaural.OCTAVE_ILD_BANDS_HZ))
    table[:, 0] = torch.rad2deg(torch.asin(torch.sin(torch.deg2rad(az)))) / 10
    table[:, 1:] = 2 * torch.sin(torch.deg2rad(az))[:, None]
    return table


def test_hold_keeps_the_last_seen_source_fixed_in_the_world_as_the_head_turns():
    table = _lateral_table()
    yaw = torch.arange(0.0, -60.0, -5.0)[None]  # the head turns right, away from a source at world azimuth 30
    relative = (30.0 - yaw[0]).long()  # where the source is relative to the head: 30 .. 85
    truth = table[relative + 180][None]
    seen = torch.tensor([[True] * 4 + [False] * 8])  # on screen for 4 latents, then out of view
    head = torch.where(seen[..., None], truth, torch.zeros_like(truth))  # off screen the head says "ahead"
    logits = seen.float() * 2 - 1
    start = (torch.zeros(1), torch.zeros(1))
    out, azimuth, present = interaural.hold_offscreen(head, logits, yaw, *start, table)
    torch.testing.assert_close(out, truth)  # seen: the head's own; then the held direction, moving with yaw
    assert present.item() == 1.0 and azimuth.item() == 30.0
    # streaming: two hops with the state carried equal one long hop
    first, *state = interaural.hold_offscreen(head[:, :6], logits[:, :6], yaw[:, :6], *start, table)
    second, *_ = interaural.hold_offscreen(head[:, 6:], logits[:, 6:], yaw[:, 6:], *state, table)
    torch.testing.assert_close(torch.cat([first, second], 1), out)
    # nothing seen yet: the head's transfer passes through
    passed, _, never = interaural.hold_offscreen(head[:, 4:], logits[:, 4:], yaw[:, 4:], *start, table)
    assert never.item() == 0.0 and torch.equal(passed, head[:, 4:])


@BAND_SETS
def test_direction_table_has_the_measured_heads_cues(centres):
    from training.frame_heads import direction_table

    table = direction_table(SpectralVAE(VAEConfig()), centres, seconds=1.0)
    itd_us = table[:, 0] * interaural.ITD_UNIT * 1e6
    assert abs(itd_us[180]) < 40  # ahead: no ITD
    assert 500 < itd_us[180 + 90] < 900 and -900 < itd_us[180 - 90] < -500  # left leads for a source on the left
    front = itd_us[180 - 80:180 + 81]
    assert (front[1:] >= front[:-1] - 25).all()  # rises with azimuth across the front (10 us label grid)
    assert table.shape == (interaural.TABLE_AZIMUTHS, interaural.transfer_params(centres))
    high = table[:, -1] * interaural.ILD_UNIT  # the top band (7 or 6.3 kHz)
    assert high[180 + 60] > 5 and high[180 - 60] < -5  # the head shadows the far ear
