"""Export and engines: static ONNX graphs, byte-identical exports, torch == onnxruntime, refusals."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from engine.backends import EngineError, example_inputs, open_engine, read_manifest
from export.steps import export_engine


@pytest.fixture(scope="module")
def engine_dir(tiny_models, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("engine") / "b2"
    export_engine(out, tiny_models["student"], hop=4, batch=2)
    return out


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_export_writes_checked_static_graphs_and_a_manifest(engine_dir, tiny_models, tmp_path):
    import onnx

    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["batch"] == 2 and manifest["evaluations"] == 2 and manifest["hop"]["latents"] == 4
    assert manifest["opset"] == 17 and set(manifest["graphs"]) == {"conditions", "denoise", "decode"}
    for entry in manifest["graphs"].values():
        model = onnx.load(str(engine_dir / entry["file"]))
        onnx.checker.check_model(model, full_check=True)
        for value in [*model.graph.input, *model.graph.output]:  # static: every dim a number
            assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value.name
        assert model.opset_import[0].version == 17
    # the same checkpoint and options give the same bytes
    again = tmp_path / "again"
    export_engine(again, tiny_models["student"], hop=4, batch=2)
    assert _digests(again) == _digests(engine_dir)


def test_onnxruntime_equals_torch_and_the_offline_generator(engine_dir, tiny_models):
    from engine.hop import StreamGenerator
    from engine.model import load_model

    ort, eager = open_engine(engine_dir, "onnxruntime", threads=1), open_engine(engine_dir, "torch", threads=1)
    model, _ = load_model(tiny_models["student"])
    offline = StreamGenerator(model, 4, 2)
    states = [r.init_state() for r in (ort, eager, offline)]
    for i in range(6):
        inputs = example_inputs(ort.g, i)
        outs = [r.hop(s, **inputs) for r, s in zip((ort, eager, offline), states)]
        assert outs[0].shape == (2, 2, 4 * 320)
        assert (outs[0] - outs[1]).abs().max() <= 1e-5
        torch.testing.assert_close(outs[1], outs[2], rtol=0, atol=0)
    # a reset through the engine interface forgets the past for the masked stream only
    for s in states[:2]:
        s.reset(torch.tensor([True, False]))
    assert states[0]["latent_present"][0].sum() == 0 and states[0]["latent_present"][1].sum() > 0


def test_an_int8_engine_quantizes_every_matmul_weight_and_stays_near_fp32(tiny_models, tmp_path):
    """int8: the Identity-routed weights shared by the unrolled flow steps are quantized too (the
    quantizer skipped them before they were unaliased), but those calibration kept fp32, named in the
    manifest; deterministic; onnxruntime only; held to the fp32 checkpoint."""
    import onnx

    from export.compare import compare_backends

    engine, again = tmp_path / "int8", tmp_path / "again"
    for out in (engine, again):
        export_engine(out, tiny_models["student"], hop=4, batch=2, precision="int8")
    assert _digests(again) == _digests(engine) and read_manifest(engine)["precision"] == "int8"
    for name in ("conditions", "denoise"):
        graph = onnx.load(str(engine / f"{name}.onnx")).graph
        # a kept MatMul reads its weight fp32, or dequantized where the other flow step's use is quantized
        weights = {w.name for w in graph.initializer}
        weights |= {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
        float_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and weights & set(n.input)]
        assert sorted(float_matmuls) == sorted(read_manifest(engine)["fp32_matmuls"][name]), name
        assert any(n.op_type == "MatMulInteger" for n in graph.node), name
    audio = compare_backends(engine, threads=1)["pairs"]["onnxruntime vs torch-eager"]["audio"]
    assert 15 < audio["snr_db"] < 200, audio  # close to fp32, and not fp32 itself
    with pytest.raises(EngineError, match="int8 engine runs on onnxruntime only"):
        open_engine(engine, "torch")


def test_shorter_context_is_its_own_geometry(tiny_models, tmp_path):
    from engine.hop import StreamGenerator
    from engine.model import load_model

    export_engine(tmp_path, tiny_models["student"], hop=4, context=8)
    ort = open_engine(tmp_path, "onnxruntime", threads=1)
    assert ort.g.window == 12
    model, _ = load_model(tiny_models["student"])
    offline = StreamGenerator(model, 4, 1, context=8)
    a, b = ort.init_state(), offline.init_state()
    for i in range(4):
        inputs = example_inputs(ort.g, i)
        assert (ort.hop(a, **inputs) - offline.hop(b, **inputs)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="multiples of 2"):
        export_engine(tmp_path / "bad", tiny_models["student"], hop=3)


def test_the_sampler_context_is_the_default_geometry(tiny_models, tmp_path, capsys):
    """`pack --context` stores the model's streaming context; every default geometry (generator, export)
    then reads it, capped by the trained window, and an explicit context still wins."""
    from dataclasses import replace

    from engine.hop import HopGeometry, StreamGenerator
    from engine.model import load_model
    from visaudio.cli import main

    packed = tmp_path / "packed.safetensors"
    assert main(["pack", str(tiny_models["student"]), str(packed), "--context", "3"]) == 2  # not whole frames
    assert "multiple of 2" in capsys.readouterr().err
    assert main(["pack", str(tiny_models["student"]), str(packed), "--context", "4"]) == 0
    model, info = load_model(packed)
    original, original_info = load_model(tiny_models["student"])
    assert model.sampler.context == 4 and info["packed_from"] == original_info.get("packed_from", tiny_models["student"].name)
    window = model.flow.cfg.window
    assert HopGeometry.of(model, 2).window == 6 and HopGeometry.of(model, 2, context=8).window == 10
    assert HopGeometry.of(model, window - 2).window == window  # capped: all the trained window holds
    assert HopGeometry.of(original, 2).window == window  # no sampler context: the trained window
    export_engine(tmp_path / "eng", packed, hop=2)
    ort = open_engine(tmp_path / "eng", "onnxruntime", threads=1)
    assert ort.g.window == 6 and read_manifest(tmp_path / "eng")["hop"]["context"] == 4
    offline = StreamGenerator(model, 2, 1)
    model.sampler = replace(model.sampler, context=None)  # the same weights, told the context instead
    explicit = StreamGenerator(model, 2, 1, context=4)
    a, b = offline.init_state(), explicit.init_state()
    for i in range(3):
        inputs = example_inputs(ort.g, i)
        torch.testing.assert_close(offline.hop(a, **inputs), explicit.hop(b, **inputs), rtol=0, atol=0)


@pytest.mark.parametrize("damage, message", [
    ("onnx", "sha256 differs"),
    ("format", "format"),
    ("shape", "I/O does not match"),
    ("missing", "missing"),
    ("json", "not JSON"),
])
def test_engines_refuse_mismatched_files(engine_dir, tmp_path, damage, message):
    bad = tmp_path / "engine"
    shutil.copytree(engine_dir, bad)
    manifest_path = bad / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "onnx":
        with open(bad / "decode.onnx", "ab") as f:
            f.write(b"\0")
    elif damage == "format":
        manifest["format"] = "visaudio-engine/0"
    elif damage == "shape":
        manifest["graphs"]["denoise"]["inputs"][1][1][0] = 3
    elif damage == "missing":
        (bad / "conditions.onnx").unlink()
    elif damage == "json":
        manifest_path.write_text("{")
    if damage in ("format", "shape"):
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=message):
        read_manifest(bad)
    with pytest.raises(EngineError, match="backend must be one of"):
        open_engine(engine_dir, "openvino")


def test_torch_backend_refuses_another_checkpoint(engine_dir, tmp_path, tiny_models):
    bad = tmp_path / "engine"
    shutil.copytree(engine_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["checkpoint"]["file"] = str(tiny_models["teacher"])
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="not the checkpoint this engine was exported from"):
        open_engine(bad, "torch")


def test_export_check_and_bench_cli(tiny_models, tmp_path, capsys):
    from visaudio.cli import main

    out = tmp_path / "eng"
    assert main(["export", "--checkpoint", str(tiny_models["student"]), "--out", str(out), "--batch", "1", "2",
                 "--check"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime vs torch" in text and "audio" in text
    assert (out / "batch1" / "manifest.json").exists() and (out / "batch2" / "manifest.json").exists()
    assert main(["bench", "engine", "--engine", str(out), "--hops", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    seen = {(r["batch"], r["backend"]) for r in report["results"]}
    assert {(1, "torch"), (1, "onnxruntime"), (2, "torch"), (2, "onnxruntime")} <= seen
    assert all(r["hop_ms"]["p50"] > 0 and np.isfinite(r["rtf"]) for r in report["results"])
    assert main(["bench", "engine", "--engine", str(tmp_path / "nothing")]) == 2  # _fail: a clear error


def test_hop_steps_make_every_tensor_on_their_inputs_device():
    """CUDA graph capture forbids host-to-device copies inside a step, so a step must make each tensor
    on its inputs' device. Checked on the CPU: with meta as the default device, a tensor made without a
    device lands on meta and the hop fails (it did, before hop.py moved the steps' buffers and flow.py
    and interaural.py made theirs on the right device). The shipped model has every optional part."""
    from engine.hop import StreamGenerator
    from engine.model import load_model

    model, _ = load_model()
    runner = StreamGenerator(model, 2, 1)
    assert runner.g.gate and runner.g.hold
    state, inputs = runner.init_state(), example_inputs(runner.g, 0)
    with torch.device("meta"):
        audio = runner.hop(state, **inputs)
    assert audio.device.type == "cpu" and torch.isfinite(audio).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")
def test_cuda_graph_backend_equals_eager(engine_dir):
    graphs, eager = open_engine(engine_dir, "torch"), open_engine(engine_dir, "torch-eager")
    a, b = graphs.init_state(), eager.init_state()
    for i in range(4):
        inputs = {k: v.cuda() for k, v in example_inputs(graphs.g, i).items()}
        assert (graphs.hop(a, **inputs) - eager.hop(b, **inputs)).abs().max() <= 1e-4


def test_tensorrt_backend_matches_onnxruntime(engine_dir):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable here (NVIDIA's own index)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs an NVIDIA GPU")
    trt, ort = open_engine(engine_dir, "tensorrt"), open_engine(engine_dir, "onnxruntime")
    a, b = trt.init_state(), ort.init_state()
    for i in range(4):
        inputs = example_inputs(ort.g, i)
        out = trt.hop(a, **{k: v.cuda() for k, v in inputs.items()}).cpu()
        assert (out - ort.hop(b, **inputs)).abs().max() <= 1e-3


def test_render_through_an_engine_equals_the_checkpoint(tiny_models, clip_dir, tmp_path, capsys):
    """`visaudio render --engine` (auto picks a backend and says which) gives the checkpoint's samples."""
    import soundfile as sf

    from visaudio.cli import main

    export_engine(tmp_path / "b1", tiny_models["student"])
    ref, engine = tmp_path / "ref.wav", tmp_path / "engine.wav"
    assert main(["render", str(clip_dir), "--out", str(ref), "--checkpoint", str(tiny_models["student"])]) == 0
    assert main(["render", str(clip_dir), "--out", str(engine), "--engine", str(tmp_path / "b1"), "--threads", "1"]) == 0
    assert "backend auto:" in capsys.readouterr().out
    a, _ = sf.read(ref, always_2d=True)
    b, _ = sf.read(engine, always_2d=True)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
    export_engine(tmp_path / "b2", tiny_models["student"], batch=2)
    assert main(["render", str(clip_dir), "--out", str(engine), "--engine", str(tmp_path / "b2"),
                 "--backend", "onnxruntime"]) == 2
    assert "engine of batch 2" in capsys.readouterr().err


def test_offscreen_hold_and_silence_gate_export_and_stream_like_the_generator(tiny_models, tmp_path):
    """The shipped default's make-up: the off-screen hold, the silence gate, a transfer head refitted
    with third-octave ILD bands (its direction table measured again for them)."""
    from engine.gate import frame_pairs
    from engine.hop import HopGeometry, StreamGenerator
    from engine.interaural import THIRD_OCTAVE_ILD_BANDS_HZ
    from engine.model import load_model, save_model
    from training.frame_heads import direction_table, train_presence, train_silence, train_transfer

    model, _ = load_model(tiny_models["student"])
    fit = dict(frames=64, holdout_clips=1, epochs=2, progress=False)
    held, report = train_presence(model, str(tiny_models["cache"]), **fit)
    held, gate_report = train_silence(held, str(tiny_models["cache"]), **fit)
    held, transfer_report = train_transfer(held, str(tiny_models["cache"]), ild_bands_hz=THIRD_OCTAVE_ILD_BANDS_HZ,
                                           **fit)
    bands = len(THIRD_OCTAVE_ILD_BANDS_HZ)
    assert held.flow.transfer_head[-1].out_features == 1 + bands and transfer_report["held_out_loss_before"] is None
    torch.testing.assert_close(held.flow.direction_table, direction_table(model.vae, THIRD_OCTAVE_ILD_BANDS_HZ))
    assert held.flow.cfg.offscreen_hold and held.flow.cfg.silence_gate
    assert gate_report["labels"] == "on_screen_states" and len(gate_report["held_out"]) == 2
    assert set(report["held_out"][0]) == {"accuracy", "base_rate", "precision", "recall"}
    with torch.no_grad():  # the tiny heads are untrained: make them say yes to some random frames and no to others
        for head in (held.flow.presence_head, held.flow.silence_head.out):
            head.weight.normal_(generator=torch.Generator().manual_seed(0))
            head.bias.zero_()
        # the silence logits of this test's frames, centred on their median and spread to +-10
        frames = torch.cat([example_inputs(HopGeometry.of(held, 4, 2), i)["frames"] for i in range(6)], 1)
        present = torch.ones(frames.shape[:2])
        logits = held.flow.silence_head(frame_pairs(frames, present, frames[:, 0], present[:, 0])).flatten(0, 1)
        out = held.flow.silence_head.out
        scale = 10.0 / logits.std(0)
        out.weight.mul_(scale[:, None])
        out.bias.copy_(-logits.median(0).values * scale)
    path = save_model(tmp_path / "held.safetensors", held)
    export_engine(tmp_path / "engine", path, hop=4, batch=2)
    ort, eager = open_engine(tmp_path / "engine", "onnxruntime", threads=1), open_engine(tmp_path / "engine", "torch", threads=1)
    assert ort.g.ild_bands_hz == THIRD_OCTAVE_ILD_BANDS_HZ  # through the manifest
    offline = StreamGenerator(held, 4, 2)
    states = [r.init_state() for r in (ort, eager, offline)]
    seen, gains = [], []
    for i in range(6):
        inputs = example_inputs(ort.g, i)
        with torch.no_grad():
            grid = held.flow.encode_frames(inputs["frames"])
            seen.append(held.flow.presence_head(grid.flatten(2))[..., 0] > 0)
        outs = [r.hop(s, **inputs) for r, s in zip((ort, eager, offline), states)]
        assert (outs[0] - outs[1]).abs().max() <= 1e-5
        torch.testing.assert_close(outs[1], outs[2], rtol=0, atol=0)
        torch.testing.assert_close(ort.values["gate_db"], offline.values["gate_db"], rtol=1e-3, atol=1e-3)  # dB
        gains.append(offline.values["gate_db"])
    seen, gains = torch.cat(seen, 1), torch.cat(gains, 1)
    assert seen.any() and not seen.all()  # both branches of the hold ran
    assert (gains > -1).any() and (gains < -10).any()  # the gate both passed and attenuated
    assert states[0]["held_present"].sum() > 0
    torch.testing.assert_close(states[0]["held_azimuth"], states[2]["held_azimuth"], rtol=0, atol=1e-4)
    # the gated decode, hop by hop with its state, equals one whole decode gated over all gains
    from training.evaluate import seams
    assert seams(held, seconds=2.0)["chunked_vs_whole_decode_max_abs"] < 1e-5


def test_int8_calibration_keeps_a_matmul_whose_activations_quantization_would_zero():
    """onnxruntime quantizes a MatMul's activations per tensor: a few huge channels (as the retrained
    student's joint.1.mlp.down sees while the context fills) set a step that zeroes the rest. Such a
    MatMul stays fp32; one with ordinary activations, or many exact zeros, is quantized."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.steps import ZEROED_LIMIT, _outlier_matmuls, zeroed_share

    g = torch.Generator().manual_seed(0)
    plain = torch.randn(64, 32, generator=g)
    spiky = plain.clone()
    spiky[:, :3] *= 300  # 3 channels of 32 at ~300 rms
    padded = plain.clone()
    padded[:48] = 0  # missing context: zeros stay exact
    assert zeroed_share(plain) < 0.05 and zeroed_share(padded) < 0.05 < ZEROED_LIMIT < zeroed_share(spiky)

    weight = numpy_helper.from_array(np.ones((32, 8), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["ya"], name="first"), helper.make_node("MatMul", ["b", "w"], ["yb"], name="second")],
        "probe", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 32]) for n in "ab"],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 8]) for n in ("ya", "yb")], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inputs = [{"a": plain, "b": padded}, {"a": plain, "b": spiky}]  # the second hop's b has the outliers
    assert _outlier_matmuls(model, inputs) == ["second"]
    assert _outlier_matmuls(model, inputs[:1]) == []
