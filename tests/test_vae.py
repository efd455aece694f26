"""The per-ear waveform VAE: causality, streaming decode == whole decode, shapes."""
import pytest
import torch

from engine.streaming import CausalConv1d
from engine.vae import VAEConfig, WaveVAE

TINY = VAEConfig(strides=(2, 4, 5), channels=(4, 8, 8, 16), latent_dim=6)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_causal_conv_streams_and_is_causal():
    torch.manual_seed(0)
    conv = CausalConv1d(3, 5, 4, dilation=2)
    x = torch.randn(2, 3, 40)
    whole = conv(x)
    state = conv.init_state(2)
    chunks = [conv.step(x[..., a:b], state) for a, b in [(0, 7), (7, 8), (8, 25), (25, 40)]]
    torch.testing.assert_close(torch.cat(chunks, -1), whole, atol=1e-6, rtol=0)
    y = x.clone()
    y[..., 30:] += 1.0
    torch.testing.assert_close(conv(y)[..., :30], whole[..., :30])


def test_strided_causal_conv_sees_only_its_past():
    conv = CausalConv1d(1, 1, 8, stride=4)
    x = torch.randn(1, 1, 32)
    out = conv(x)
    assert out.shape[-1] == 8
    y = x.clone()
    y[..., 12:] = 0.0  # frames 0..2 cover samples 0..11
    torch.testing.assert_close(conv(y)[..., :3], out[..., :3])


def test_vae_shapes_and_hop():
    vae = WaveVAE(TINY)
    audio = torch.randn(3, 2, TINY.hop * 7)
    z = vae.encode(audio)
    assert z.shape == (3, 2, 6, 7)
    assert vae.decode(z).shape == audio.shape
    with pytest.raises(ValueError, match="multiple of the VAE hop"):
        vae.encode(audio[..., :-1])


def test_streaming_decode_equals_whole_decode():
    torch.manual_seed(1)
    vae = WaveVAE(TINY).eval()
    z = torch.randn(2, TINY.latent_dim, 23)
    with torch.no_grad():
        whole = vae.decoder(z)
        state = vae.decoder.init_state(2)
        parts = [vae.decoder.step(z[..., a:b], state) for a, b in [(0, 1), (1, 5), (5, 6), (6, 23)]]
    assert (torch.cat(parts, -1) - whole).abs().max() < 1e-5
    # reset gives a fresh stream: decoding again from the start repeats the output
    state.reset()
    with torch.no_grad():
        again = vae.decoder.step(z[..., :5], state)
    torch.testing.assert_close(again, whole[..., : 5 * TINY.hop])


def test_encoder_and_decoder_are_causal():
    torch.manual_seed(2)
    vae = WaveVAE(TINY).eval()
    audio = torch.randn(1, 2, TINY.hop * 10)
    with torch.no_grad():
        z = vae.encode(audio)
        changed = audio.clone()
        changed[..., TINY.hop * 6:] += 1.0
        z2 = vae.encode(changed)
        torch.testing.assert_close(z2[..., :6], z[..., :6])
        assert not torch.allclose(z2[..., 6:], z[..., 6:])
        w = vae.decode(z)
        z3 = z.clone()
        z3[..., 6:] += 1.0
        torch.testing.assert_close(vae.decode(z3)[..., : 6 * TINY.hop], w[..., : 6 * TINY.hop])


def tiny_training_config(**kw):
    from training.train_vae import TrainVAEConfig

    base = dict(vae=TINY, steps=6, batch=2, segment_seconds=0.25, eval_every=6, eval_scenes=1,
                checkpoint_every=3, scene_pool=2, refresh_every=100, scene_seconds=1.0)
    base.update(kw)
    return TrainVAEConfig(**base)


def test_training_checkpoints_resume_and_reload(tmp_path):
    import json

    from training.train_vae import load_vae, train_vae

    cfg = tiny_training_config()
    ckpt = train_vae(cfg, tmp_path / "run", progress=False, device="cpu")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert set(log[-1]["eval"]) >= {"stft_distance", "itd_error_us", "ild_error_db"}
    model, info = load_vae(ckpt)
    assert info["step"] == 6 and VAEConfig.from_json(info["config"]) == TINY
    # resume: continues from step 6 to 9 without starting over
    train_vae(tiny_training_config(steps=9), tmp_path / "run", resume=True, progress=False, device="cpu")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-3:] == [7, 8, 9]
    resumed, info = load_vae(ckpt)
    assert info["step"] == 9
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


def test_loss_decreases_on_a_fixed_batch():
    from training.train_vae import vae_loss

    torch.manual_seed(0)
    cfg = tiny_training_config()
    model = WaveVAE(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t = torch.arange(TINY.hop * 20) / 16000
    audio = torch.stack([torch.sin(2 * torch.pi * 440 * t), 0.5 * torch.sin(2 * torch.pi * 440 * (t - 3e-4))])[None]
    losses = []
    for _ in range(40):
        recon, mean, logvar = model(audio)
        loss = vae_loss(cfg, audio, recon, mean, logvar)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_bad_checkpoints_are_named(tmp_path):
    from engine.checkpoint import CheckpointError, save_checkpoint
    from training.train_vae import load_vae

    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_vae(junk)
    other = save_checkpoint(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, "flow", {})
    with pytest.raises(CheckpointError, match="'flow' checkpoint, expected 'vae'"):
        load_vae(other)
    model = WaveVAE(TINY)
    wrong = save_checkpoint(tmp_path / "wrong.safetensors", model.state_dict(), "vae",
                            {"config": VAEConfig(strides=(2, 4, 5), channels=(4, 8, 8, 32), latent_dim=6).to_json()})
    with pytest.raises(CheckpointError, match="shape"):
        load_vae(wrong)
