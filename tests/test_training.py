"""Training, resume, DDP, distillation, evaluation and the CLI on tiny configs (real code paths)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import TINY_FLOW
from engine.checkpoint import load_checkpoint
from engine.flow import FlowConfig
from engine.model import load_model
from training.train_flow import TrainFlowConfig, train_flow
from visaudio.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _cfg(paths, **kw):
    base = dict(flow=FlowConfig(**TINY_FLOW), vae=str(paths["vae"]), cache=str(paths["cache"]), holdout=1,
                steps=4, batch=4, warmup=1, eval_every=2, checkpoint_every=2)
    return TrainFlowConfig(**{**base, **kw})


def test_models_carry_their_sampler_and_role(tiny_models):
    teacher, info = load_model(tiny_models["teacher"])
    student, sinfo = load_model(tiny_models["student"])
    mono, _ = load_model(tiny_models["mono"])
    assert (teacher.role, student.role, mono.role) == ("teacher", "student", "mono")
    assert teacher.sampler.evaluations == 50 and student.sampler.evaluations == 2
    assert mono.ears == 1 and teacher.ears == 2
    assert info["train"]["step"] == 4 and sinfo["distill"]["config"]["student_times"] == [0.0, 0.5, 1.0]


def test_training_is_reproducible_and_resumes(tiny_models, tmp_path):
    a = train_flow(_cfg(tiny_models), tmp_path / "a", progress=False)
    b = train_flow(_cfg(tiny_models), tmp_path / "b", progress=False)
    ta, _ = load_checkpoint(a, "model")
    tb, _ = load_checkpoint(b, "model")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    more = train_flow(_cfg(tiny_models, steps=6), tmp_path / "a", resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    _, info = load_checkpoint(more, "model")
    assert info["train"]["step"] == 6
    with pytest.raises(ValueError, match="another flow config"):
        train_flow(_cfg(tiny_models, steps=8, flow=FlowConfig(**{**TINY_FLOW, "width": 64})), tmp_path / "a",
                   resume=True, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA training path (bf16 autocast) needs a GPU")
def test_training_on_cuda_with_bf16_autocast(tiny_models, tmp_path):
    path = train_flow(_cfg(tiny_models), tmp_path / "cuda", device="cuda", progress=False)
    tensors, info = load_checkpoint(path, "model")
    assert info["train"]["device"].startswith("cuda") and info["train"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "cuda" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_two_process_ddp_with_gloo(tiny_models, tmp_path):
    cfg = _cfg(tiny_models).to_json()
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "visaudio.cli", "train", "flow", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "ddp"),
           "--device", "cpu"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    _, info = load_checkpoint(tmp_path / "ddp" / "model.safetensors", "model")
    assert info["train"]["world_size"] == 2 and info["train"]["step"] == 4


def test_eval_reports_every_system_and_plots(tiny_models, tmp_path, capsys):
    from export.steps import export_engine

    out, engine = tmp_path / "eval", tmp_path / "fp32"
    export_engine(engine, tiny_models["student"], hop=4)
    code = main(["eval", "--checkpoint", str(tiny_models["student"]), "--teacher", str(tiny_models["teacher"]),
                 "--mono", str(tiny_models["mono"]), "--scenes", "2", "--head-turns", "1", "--teacher-scenes", "1",
                 "--seam-seconds", "4", "--engine", str(engine), "--out", str(out), "--json"])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report["systems"]) >= {"student", "teacher", "mono copied", "two-stage", "engine fp32 (fp32)"}
    # the engine streams the student's scenes, seeds and hop through onnxruntime: the same scores
    for key in ("itd_error_us", "ild_error_db", "lateral_error_deg", "stft_distance"):
        assert report["systems"]["engine fp32 (fp32)"][key] == pytest.approx(report["systems"]["student"][key], rel=1e-3)
    for name in ("student", "teacher", "mono copied", "two-stage", "engine fp32 (fp32)"):
        m = report["systems"][name]
        assert np.isfinite(m["itd_error_us"]) and m["head_turn_correlation"] is not None
        split = m["by_acoustics"]
        assert set(split) == {"anechoic", "room"} and split["anechoic"]["scenes"] + split["room"]["scenes"] <= 2
    assert report["systems"]["student"]["evaluations_per_hop"] == 2
    floor = report["systems"]["truth, another late tail"]["by_acoustics"]  # anechoic: the reference itself
    for subset in ("in_view", "direct", "onset"):
        assert floor["anechoic"]["scenes"] == 0 or floor["anechoic"][f"itd_error_us_{subset}"] in (0.0, None)
    assert (out / "head_turn.png").stat().st_size > 10_000
    assert report["seams"]["chunked_vs_whole_decode_max_abs"] < 1e-4 and report["seams"]["ratio"] > 0


def test_render_cli_writes_video_length_audio(tiny_models, clip_dir, tmp_path):
    out = tmp_path / "out.wav"
    assert main(["render", str(clip_dir), "--out", str(out), "--checkpoint", str(tiny_models["student"])]) == 0
    audio, rate = sf.read(out, always_2d=True)
    assert rate == 16000 and audio.shape == (32000, 2)
    mono = tmp_path / "mono.wav"
    assert main(["render", str(clip_dir / "clip.mp4"), "--out", str(mono), "--checkpoint", str(tiny_models["mono"])]) == 0
    audio, _ = sf.read(mono, always_2d=True)
    np.testing.assert_array_equal(audio[:, 0], audio[:, 1])
    video = tmp_path / "out.mp4"  # the video with its generated binaural track
    assert main(["render", str(clip_dir), "--out", str(video), "--checkpoint", str(tiny_models["student"])]) == 0
    from training.clips import _decode_mp4

    frames, fps, track = _decode_mp4(video, want_audio=True, sample_rate=16000)
    assert frames.shape[0] == 50 and fps == 25 and track.shape[0] == 2 and abs(track.shape[1] - 32000) < 2048


def test_render_cli_rejects_bad_inputs(tiny_models, clip_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["render", str(clip_dir), "--out", str(tmp_path / "o.wav"), "--checkpoint", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    assert main(["render", str(clip_dir), "--out", str(tmp_path / "o.wav"), "--checkpoint", str(tiny_models["vae"])]) == 2
    assert "expected 'model'" in capsys.readouterr().err
    assert main(["render", str(tmp_path / "nothing.mp4"), "--out", str(tmp_path / "o.wav"),
                 "--checkpoint", str(tiny_models["student"])]) == 2
    assert "video not found" in capsys.readouterr().err


def test_pack_halves_the_flow_weights_and_keeps_the_model(tiny_models, tmp_path):
    out = tmp_path / "packed.safetensors"
    assert main(["pack", str(tiny_models["teacher"]), str(out)]) == 0
    packed, info = load_model(out)
    original, _ = load_model(tiny_models["teacher"])
    assert out.stat().st_size < Path(tiny_models["teacher"]).stat().st_size
    assert packed.role == "teacher" and info["packed_from"] == "model.safetensors" and "train" in info
    for (name, a), b in zip(original.flow.state_dict().items(), packed.flow.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3, msg=name)


def test_cache_marks_frames_where_a_visible_source_dominates(clip_dir, tmp_path):
    """build_cache and cache_from_dataset agree on the mask, which follows the metadata."""
    import json
    import shutil

    from training.scene_cache import build_cache, cache_from_dataset, load_cache, visible_dominant

    dataset = tmp_path / "dataset"
    shutil.copytree(clip_dir, dataset / "seed5")
    cached = load_cache(cache_from_dataset(tmp_path / "from_dataset", dataset, seconds=2.0))
    meta = json.loads((clip_dir / "meta.json").read_text())
    expected = visible_dominant(meta["frames"][:50])
    np.testing.assert_array_equal(cached.visible_dominant[0], expected)
    for f, frame in enumerate(meta["frames"][:50]):  # a marked frame has a visible, sounding source
        if expected[f]:
            assert any(s["visible"] and s["active"] for s in frame["sources"])
    rendered = load_cache(build_cache(tmp_path / "rendered", 1, seed=5, seconds=2.0, progress=False))
    assert rendered.visible_dominant.dtype == bool
    np.testing.assert_array_equal(rendered.visible_dominant[0], expected)  # the same scene (seed 5, 2 s)
    # the rule on hand-made frames: a visible source 10 dB over an off-screen one; then the reverse;
    # then two within 6 dB; then the visible one silent
    src = lambda visible, active, level: {"azimuth": 0.0, "elevation": 0.0, "visible": visible,  # noqa: E731
                                          "active": active, "level_db": level}
    frames = [{"t": 0.0, "sources": [src(True, True, -10.0), src(False, True, -20.0)]},
              {"t": 0.04, "sources": [src(True, True, -20.0), src(False, True, -10.0)]},
              {"t": 0.08, "sources": [src(True, True, -10.0), src(False, True, -13.0)]},
              {"t": 0.12, "sources": [src(True, False, -10.0), src(False, True, -20.0)]}]
    assert visible_dominant(frames).tolist() == [True, False, False, False]


def test_a_cache_rendered_by_worker_processes_equals_one_rendered_in_process(tmp_path):
    """build_cache with jobs > 1 keeps the scenes in seed order and renders the same arrays."""
    from training.scene_cache import build_cache, load_cache

    serial = load_cache(build_cache(tmp_path / "serial", 5, seed=11, seconds=1.0, progress=False))
    parallel = load_cache(build_cache(tmp_path / "parallel", 5, seed=11, seconds=1.0, jobs=2, progress=False))
    for name in ("frames", "pose", "audio", "visible_dominant"):
        np.testing.assert_array_equal(getattr(parallel, name), getattr(serial, name), err_msg=name)
    assert not np.array_equal(serial.audio[0], serial.audio[1])  # different seeds, different scenes


def test_pack_sets_the_interaural_side_only_where_it_means_something(tiny_models, tmp_path, capsys):
    out = tmp_path / "side.safetensors"
    assert main(["pack", str(tiny_models["student"]), str(out), "--interaural-side", "0"]) == 0
    assert load_model(out)[0].sampler.interaural_side == 0.0
    assert main(["pack", str(tiny_models["student"]), str(out), "--interaural-side", "1.5"]) == 2
    assert "within [0, 1]" in capsys.readouterr().err
    assert main(["pack", str(tiny_models["mono"]), str(out), "--interaural-side", "0"]) == 2
    assert "interaural transfer head" in capsys.readouterr().err


def test_pack_sets_the_guidance_rescale_only_on_a_model_that_samples_with_guidance(tiny_models, tmp_path, capsys):
    out = tmp_path / "rescaled.safetensors"
    assert load_model(tiny_models["teacher"])[0].sampler.guidance != 1.0
    assert main(["pack", str(tiny_models["teacher"]), str(out), "--guidance-rescale", "0.7"]) == 0
    assert load_model(out)[0].sampler.guidance_rescale == 0.7
    assert main(["pack", str(tiny_models["teacher"]), str(out), "--guidance-rescale", "2"]) == 2
    assert "within [0, 1]" in capsys.readouterr().err
    assert main(["pack", str(tiny_models["student"]), str(out), "--guidance-rescale", "1"]) == 2
    assert "guidance 1" in capsys.readouterr().err


def test_distillation_keeps_the_frame_encoder_and_transfer_head_of_the_teacher(tiny_models, tmp_path):
    """The transfer head reads the frame encoder's grid, so both stay the teacher's (DistillConfig.frozen)."""
    from training.distill import DistillConfig, distill

    teacher, _ = load_model(tiny_models["teacher"])
    student, _ = load_model(tiny_models["student"])
    for module in ("frame_encoder", "transfer_head"):
        for (name, a), b in zip(getattr(teacher.flow, module).state_dict().items(),
                                getattr(student.flow, module).state_dict().values()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{module}.{name}")
    assert any(not torch.equal(a, b) for a, b in zip(teacher.flow.joint.parameters(), student.flow.joint.parameters()))
    with pytest.raises(ValueError, match="frame_encoderr"):
        distill(DistillConfig(teacher=str(tiny_models["teacher"]), cache=str(tiny_models["cache"]), holdout=1,
                              frozen=("frame_encoderr",)), tmp_path / "s", progress=False)


def test_an_ild_only_refit_to_third_octaves_keeps_the_itd_and_starts_from_the_heads_own_ild_curve(tiny_models):
    """`train transfer --ild-bands third-octave --ild-only`: the hidden layer and the ITD output stay the
    model's (so where it places a source); the 15 band outputs start as the head's own 8-band ILD
    curve read at their centres, and the fit keeps the best held-out epoch (0: that start)."""
    from engine.interaural import THIRD_OCTAVE_ILD_BANDS_HZ, triangles
    from training.frame_heads import train_transfer, transfer_examples
    from training.scene_cache import load_cache

    model, _ = load_model(tiny_models["student"])
    cache_dir, third = str(tiny_models["cache"]), THIRD_OCTAVE_ILD_BANDS_HZ
    fit = dict(progress=False, holdout_clips=1, ild_bands_hz=third, ild_only=True)
    started, start_report = train_transfer(model, cache_dir, epochs=0, **fit)
    refit, report = train_transfer(model, cache_dir, epochs=20, lr=3e-3, **fit)
    assert refit.flow.cfg.ild_bands_hz == third and report["fitted"] == "ild outputs"
    for name, tensor in model.flow.state_dict().items():
        if name not in ("transfer_head.2.weight", "transfer_head.2.bias"):
            torch.testing.assert_close(refit.flow.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    x, _, _ = transfer_examples(model, load_cache(cache_dir), range(2), progress=False)
    with torch.no_grad():
        own, first, fitted = (m.flow.transfer_head(x) for m in (model, started, refit))
    torch.testing.assert_close(fitted[:, 0], own[:, 0], rtol=0, atol=1e-6)  # the same ITD
    own_curve = own[:, 1:] @ triangles(torch.tensor(third), model.flow.cfg.ild_bands_hz)  # at the new centres
    torch.testing.assert_close(first[:, 1:], own_curve, rtol=1e-4, atol=1e-4)
    assert report["held_out_loss_start"] == start_report["held_out_loss"] >= report["held_out_loss"]
    assert report["held_out_loss"] == min([report["held_out_loss_start"], *report["held_out_history"]])


def test_the_transfer_head_refit_fits_its_labels_and_changes_nothing_else(tiny_models, tmp_path, capsys):
    """`visaudio train transfer`: a fresh head on the frozen frame encoder, fitted on the cache's
    visible-dominant frames; the standardisation folded back in, so the written head reads raw grids."""
    from training.frame_heads import train_transfer, transfer_examples
    from training.scene_cache import load_cache
    from training.train_flow import transfer_loss

    model, _ = load_model(tiny_models["student"])
    refit, report = train_transfer(model, str(tiny_models["cache"]), progress=False, epochs=60, lr=3e-3,
                                   holdout_clips=1)
    for name, tensor in model.flow.state_dict().items():
        if not name.startswith("transfer_head."):
            torch.testing.assert_close(refit.flow.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert not torch.equal(refit.flow.transfer_head[0].weight, model.flow.transfer_head[0].weight)
    cache = load_cache(str(tiny_models["cache"]))
    x, y, w = transfer_examples(refit, cache, range(len(cache) - 1), progress=False)
    with torch.no_grad():  # on the training frames, read raw (the fold), the refit beats the tiny model's own head
        losses = [float(transfer_loss(m.flow.transfer_head(x)[:, None].expand_as(y), y, w)) for m in (model, refit)]
    assert losses[1] < 0.8 * losses[0], losses
    assert report["held_out_loss"] == min(report["held_out_history"]) and 1 <= report["best_epoch"] <= 60
    assert report["frames"] == len(x) > 0
    assert main(["train", "transfer", "--checkpoint", str(tiny_models["student"]), "--cache", str(tiny_models["cache"]),
                 "--out", str(tmp_path / "refit.safetensors"), "--epochs", "2", "--threads", "1"]) == 2
    assert "need more than the 200 held out" in capsys.readouterr().err
