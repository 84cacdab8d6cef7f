"""aptp.export: experts -> ONNX, manifest, pipeline directories, aptp-export.

One tiny checkpoint (two codes pruning ~16% and ~50% of the MACs) is exported once per session
through the CLI; most tests read that export. Everything runs on CPU with onnxruntime.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from export_fixtures import build_tiny_checkpoint, build_tiny_pipeline  # noqa: E402

from aptp.errors import ArtifactError, ConfigError  # noqa: E402
from aptp.export.manifest import read_manifest, write_manifest  # noqa: E402

TRT_AVAILABLE, TRT_DETAIL = None, None


def _trt():
    global TRT_AVAILABLE, TRT_DETAIL
    if TRT_AVAILABLE is None:
        from aptp.export.tensorrt import tensorrt_status

        TRT_AVAILABLE, TRT_DETAIL = tensorrt_status()
    return TRT_AVAILABLE, TRT_DETAIL


# -- session fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_pipeline) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "ckpt", tiny_pipeline)


@pytest.fixture(scope="session")
def components(tiny_pipeline):
    from aptp.train.models import load_components

    return load_components(str(tiny_pipeline))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_checkpoint):
    """`aptp-export` run once: pipeline dirs, TensorRT requested, Euler with 4 steps."""
    from aptp.export.cli import main

    root = tmp_path_factory.mktemp("export") / "A"
    records = _Records()
    logger = logging.getLogger("aptp.export")
    logger.addHandler(records)
    try:
        rc = main(["--checkpoint", str(tiny_checkpoint), "--output", str(root), "--pipeline-dirs", "--tensorrt",
                   "--scheduler", "euler", "--steps", "4", "--max-batch", "2"])
    finally:
        logger.removeHandler(records)
    assert rc == 0
    return SimpleNamespace(root=root, warnings=records.messages, manifest=read_manifest(root))


def _unet_inputs(batch=3, height=16, width=24, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, height, width, generator=g), torch.tensor([37.0, 500.0, 981.0][:batch]),
            torch.randn(batch, 32, 64, generator=g))


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- the exported experts ----------------------------------------------------------------------


def test_every_expert_onnx_matches_sliced_expert_and_masked_unet(exported, tiny_checkpoint, components):
    from aptp.export import load_expert
    from aptp.train.checkpoint import load_codes, load_layout
    from aptp.train.gates import apply_gates

    layout = load_layout(tiny_checkpoint)
    _, masks = load_codes(tiny_checkpoint)
    sample, timestep, context = _unet_inputs()  # another batch and width than the export traced
    feed = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": context.numpy()}
    with torch.no_grad():
        dense_out = components.unet(sample, timestep, context).sample
    for entry in exported.manifest["experts"]:
        code = entry["code"]
        onnx_out = _session(exported.root / entry["unet"]).run(None, feed)[0]
        # The export's own PyTorch artifact, rebuilt without any mask.
        expert = load_expert(exported.root / "experts" / f"expert_{code}")
        with torch.no_grad():
            sliced_out = expert(sample, timestep, context).sample.numpy()
            with apply_gates(components.unet, layout, masks[code].float()):
                masked_out = components.unet(sample, timestep, context).sample.numpy()
        assert np.abs(onnx_out - sliced_out).max() < 1e-3
        assert np.abs(onnx_out - masked_out).max() < 1e-3
        # The expert really is pruned: it differs from the dense UNet.
        assert np.abs(onnx_out - dense_out.numpy()).max() > 1e-2
        assert entry["max_abs_error"] < 1e-3 and entry["max_abs_error_vs_masked"] < 1e-3
        assert sum(p.numel() for p in expert.parameters()) < sum(p.numel() for p in components.unet.parameters())
    dense = exported.manifest["dense"]
    dense_onnx = _session(exported.root / dense["unet"]).run(None, feed)[0]
    assert np.abs(dense_onnx - dense_out.numpy()).max() < 1e-3


def test_manifest_macs_ratios_and_shares_are_the_checkpoints(exported, tiny_checkpoint):
    from aptp.train.checkpoint import CheckpointInfo

    info = CheckpointInfo.load(tiny_checkpoint)
    manifest = exported.manifest
    assert manifest["num_codes"] == info.num_codes == len(manifest["experts"])
    ratios = [e["macs_ratio"] for e in manifest["experts"]]
    assert ratios == pytest.approx(info.code_macs_ratio, abs=0)
    assert len(set(round(r, 3) for r in ratios)) == len(ratios) and max(ratios) < 1.0
    assert [e["share"] for e in manifest["experts"]] == pytest.approx(info.code_share)
    assert manifest["dense"]["macs_ratio"] == 1.0


def test_manifest_schema_and_files(exported, tiny_pipeline):
    from diffusers import DDIMScheduler

    from aptp.export.scheduler_tables import build_scheduler_table

    m, root = exported.manifest, exported.root
    assert (m["format"], m["format_version"]) == ("aptp-export", 1)
    assert m["base_model"] == str(tiny_pipeline)
    assert m["image"]["height"] == 64 and m["latent"] == {"channels": 4, "height": 16, "width": 16}
    assert m["vae"]["scale_factor"] == 4 and m["vae_decoder"]["applies_scaling_factor"] is True
    assert m["tokenizer"]["file"] == "tokenizer/tokenizer.json" and m["tokenizer"]["max_length"] == 32
    assert m["router"]["encoder"]["tokenizer"] == "router/tokenizer.json"
    assert np.asarray(m["router"]["code_table"]).shape == (2, len(m["router"]["unit_weights"]))
    assert m["max_batch"] == 2 and m["guidance_scale"] == 7.5
    assert m["io"]["unet"]["inputs"]["sample"]["shape"] == ["batch", 4, "height", "width"]
    # Every file on disk is hashed, and nothing else.
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    for rel in ("router/encoder.onnx", "router/head.onnx", "text_encoder/model.onnx", "vae_decoder/model.onnx",
                "vae_encoder/model.onnx",
                "experts/expert_0/arch_spec.json", "experts/expert_1/diffusion_pytorch_model.safetensors"):
        assert rel in m["files"]
    expected = build_scheduler_table("euler", DDIMScheduler.load_config(str(tiny_pipeline), subfolder="scheduler"), 4)
    assert m["scheduler"]["name"] == "euler" and m["scheduler"]["timesteps"] == expected["timesteps"]
    assert m["scheduler"]["coef_model"] == pytest.approx(expected["coef_model"])
    # No staging or old directories left beside the export.
    assert [p.name for p in root.parent.iterdir()] == ["A"]


def test_router_graphs_reproduce_training_routing(exported, tiny_checkpoint):
    from tokenizers import Tokenizer

    from aptp.train.checkpoint import ROUTER_HEAD_DIR, load_codes, load_layout
    from aptp.train.router import RouterHead, SentenceEncoder, group_weighted_cosine

    router = exported.manifest["router"]
    prompts = ["a cat sleeping on a red sofa", "mountains at night under the milky way", "a bowl of ramen", "x"]
    tokenizer = Tokenizer.from_file(str(exported.root / router["encoder"]["tokenizer"]))
    tokenizer.enable_truncation(router["encoder"]["max_length"])
    tokenizer.enable_padding(pad_id=router["encoder"]["pad_token_id"])
    encoded = tokenizer.encode_batch(prompts)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    embedding = _session(exported.root / router["encoder"]["file"]).run(
        None, {"input_ids": ids, "attention_mask": mask})[0]
    scores = _session(exported.root / router["head"]["file"]).run(None, {"sentence_embedding": embedding})[0]

    encoder = SentenceEncoder("all-MiniLM-L6-v2")
    want_embedding = encoder.encode(prompts)
    head = RouterHead.from_pretrained(str(tiny_checkpoint / ROUTER_HEAD_DIR)).eval()
    logits, _ = load_codes(tiny_checkpoint)
    with torch.no_grad():
        want_scores = group_weighted_cosine(head(want_embedding), logits, load_layout(tiny_checkpoint).unit_weights)
    assert np.abs(embedding - want_embedding.numpy()).max() < 1e-4
    assert scores.shape == (len(prompts), 2)
    assert np.abs(scores - want_scores.numpy()).max() < 1e-4
    assert scores.argmax(1).tolist() == want_scores.argmax(1).tolist()
    # The code table in the manifest is the checkpoint's.
    assert np.allclose(router["code_table"], logits.numpy())


def test_text_encoder_and_vae_decoder_graphs(exported, components):
    from tokenizers import Tokenizer

    m, root = exported.manifest, exported.root
    tokenizer = Tokenizer.from_file(str(root / m["tokenizer"]["file"]))
    length = m["tokenizer"]["max_length"]
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(pad_id=m["tokenizer"]["pad_token_id"], length=length)
    prompts = ["a lighthouse on a cliff", ""]
    ids = np.array([e.ids for e in tokenizer.encode_batch(prompts)], dtype=np.int32)
    # The runtime's tokenizer file reproduces the training tokenizer.
    assert ids.tolist() == components.tokenize(prompts).tolist()
    states = _session(root / m["text_encoder"]["file"]).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = components.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    assert np.abs(states - want).max() < 1e-3

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    image = _session(root / m["vae_decoder"]["file"]).run(None, {"latent_sample": latents.numpy()})[0]
    with torch.no_grad():
        want = components.vae.decode(latents / m["vae"]["scaling_factor"]).sample.numpy()
    assert image.shape == (2, 3, 64, 64)
    assert np.abs(image - want).max() < 1e-3


def test_vae_encoder_graph_is_the_scaled_posterior(exported, components):
    """img2img's encoder: the posterior's mean and std times scaling_factor, checked at export."""
    m, root = exported.manifest, exported.root
    entry = m["vae_encoder"]
    assert entry["file"] == "vae_encoder/model.onnx" and entry["applies_scaling_factor"] is True
    assert 0 <= entry["max_abs_error"] < 1e-3 and m["files"][entry["file"]]
    assert list(m["io"]["vae_encoder"]["outputs"]) == ["latent_mean", "latent_std"]
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean, std = _session(root / entry["file"]).run(None, {"sample": image.numpy()})
    with torch.no_grad():
        posterior = components.vae.encode(image).latent_dist
    scale = m["vae"]["scaling_factor"]
    assert mean.shape == std.shape == (2, 4, 16, 16) and std.min() > 0
    assert np.abs(mean - scale * posterior.mean.numpy()).max() < 1e-4
    assert np.abs(std - scale * posterior.std.numpy()).max() < 1e-4


def test_tensorrt_request_without_tensorrt_warns_and_exports_onnx(exported):
    available, detail = _trt()
    if available:
        assert exported.manifest["tensorrt"]["built"] is True
        for entry in exported.manifest["experts"]:
            assert (exported.root / entry["tensorrt"]).is_file()
    else:
        assert exported.manifest["tensorrt"] == {"built": False, "reason": detail}
        assert any("TensorRT is unavailable" in w and detail in w for w in exported.warnings)
        assert all(entry["tensorrt"] is None for entry in exported.manifest["experts"])


# -- interoperable pipeline directories -------------------------------------------------------


def test_onnx_pipeline_dirs_generate_images(exported, components):
    from diffusers import OnnxStableDiffusionPipeline

    pipelines = exported.manifest["pipelines"]["dirs"]
    assert sorted(pipelines) == ["dense", "expert_0", "expert_1"]
    # The export used Euler, which diffusers' ONNX pipeline cannot run: DDIM instead, with a warning.
    assert exported.manifest["pipelines"]["scheduler"] == "ddim"
    assert any("cannot run the euler sampler" in w for w in exported.warnings)
    images = {}
    for name in ("dense", "expert_1"):
        directory = exported.root / pipelines[name]
        index = json.loads((directory / "model_index.json").read_text())
        assert index["tokenizer"] == ["transformers", "BertTokenizerFast"]  # loads tokenizer.json in 4.x and 5
        assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
        pipe = OnnxStableDiffusionPipeline.from_pretrained(str(directory))
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red cube on a table", height=64, width=64, num_inference_steps=2,
                   generator=np.random.RandomState(0), output_type="np")
        image = out.images
        # diffusers' pipeline assumes a VAE factor of 8; the tiny VAE's is 4.
        assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0
        images[name] = image
    assert np.abs(images["dense"] - images["expert_1"]).max() > 1e-3
    # The decoder folds 0.18215 / scaling_factor in: the pipeline's 1/0.18215 becomes 1/scaling_factor.
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    decoded = _session(exported.root / pipelines["expert_1"] / "vae_decoder" / "model.onnx").run(
        None, {"latent_sample": (latents / 0.18215).numpy()})[0]
    with torch.no_grad():
        want = components.vae.decode(latents / components.vae.config.scaling_factor).sample.numpy()
    assert np.abs(decoded - want).max() < 1e-3
    _check_optimum_layout(exported.root / pipelines["expert_1"], components, latents, want)


def _check_optimum_layout(directory, components, latents, want):
    """What optimum's ORTStableDiffusionPipeline reads besides the graphs (it cannot be installed
    beside transformers 5; README "Export" shows the check to run in its own environment)."""
    import transformers

    configs = {name: json.loads((directory / name / "config.json").read_text())
               for name in ("unet", "text_encoder", "vae_decoder", "vae_encoder")}
    assert configs["unet"]["_class_name"] == "UNet2DConditionModel"
    assert configs["unet"]["in_channels"] == components.unet.config.in_channels
    assert configs["text_encoder"]["hidden_size"] == components.text_encoder.config.hidden_size
    assert configs["text_encoder"]["model_type"] == "clip_text_model"
    for name in ("vae_decoder", "vae_encoder"):
        assert configs[name]["_class_name"] == "AutoencoderKL"
        assert configs[name]["latent_channels"] == components.vae.config.latent_channels
        assert configs[name]["_aptp_model_scaling_factor"] == components.vae.config.scaling_factor
    # optimum decodes vae_decoder(latents / config scaling_factor): with the graph's folded scale
    # that must be the model's own decode of latents / scaling_factor.
    scale = configs["vae_decoder"]["scaling_factor"]
    decoded = _session(directory / "vae_decoder" / "model.onnx").run(
        None, {"latent_sample": (latents / scale).numpy()})[0]
    assert np.abs(decoded - want).max() < 1e-3
    index = json.loads((directory / "model_index.json").read_text())
    tokenizer = getattr(transformers, index["tokenizer"][1]).from_pretrained(str(directory / "tokenizer"))
    assert tokenizer("a red cube").input_ids == components.tokenizer("a red cube").input_ids


# -- benchmark script --------------------------------------------------------------------------


def test_benchmark_script_times_dense_and_experts(exported, capsys, tmp_path):
    from aptp.benchmarks.latency.expert_speed import main

    out = tmp_path / "rows.json"
    assert main(["--artifacts", str(exported.root), "--repeats", "2", "--warmup", "1", "--threads", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "latency ratio" in printed and "expert_1" in printed
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["dense", "expert_0", "expert_1"]
    assert [r["macs_ratio"] for r in rows[1:]] == [e["macs_ratio"] for e in exported.manifest["experts"]]
    assert rows[0]["latency_ratio"] == 1.0
    assert all(r["median_ms"] > 0 and r["latency_ratio"] > 0 and r["repeats"] == 2 for r in rows)


# -- precision and external data ---------------------------------------------------------------


def test_fp16_expert_export_runs_in_onnxruntime(tiny_checkpoint, tmp_path):
    from aptp.export import load_expert
    from aptp.export.onnx_configs import UNetOnnxConfig
    from aptp.export.onnx_export import export_and_validate

    expert = load_expert(tiny_checkpoint / "experts" / "expert_1")
    config = UNetOnnxConfig.from_unet(expert, 16, 16, 32, precision="fp16")
    graph = export_and_validate(expert, config, tmp_path / "unet16.onnx")
    types = {i.name: i.type for i in _session(graph.path).get_inputs()}
    assert types == {"sample": "tensor(float16)", "timestep": "tensor(float)",
                     "encoder_hidden_states": "tensor(float16)"}
    # Really computed in fp16 (not exactly fp32), yet within the documented fp16 tolerance.
    assert 0 < graph.max_abs_error <= config.ATOL_FOR_VALIDATION_FP16


def test_external_data_above_threshold(components, tmp_path):
    import onnx

    from aptp.export.onnx_configs import TextEncoderOnnxConfig
    from aptp.export.onnx_export import export_and_validate

    config = TextEncoderOnnxConfig.from_model(components.text_encoder, 32)
    graph = export_and_validate(components.text_encoder, config, tmp_path / "te" / "model.onnx",
                                external_data_threshold=4096)
    assert graph.external_data == tmp_path / "te" / "model.onnx.data"
    weights = graph.external_data.stat().st_size
    assert weights > 10 * graph.path.stat().st_size
    proto = onnx.load(str(graph.path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert graph.max_abs_error < 1e-3
    # Below the threshold the same graph stays one file.
    inline = export_and_validate(components.text_encoder, config, tmp_path / "te2" / "model.onnx")
    assert inline.external_data is None and sorted(os.listdir(tmp_path / "te2")) == ["model.onnx"]


# -- ONNX configs ------------------------------------------------------------------------------

_DIMS = {"batch": 2, "steps": 2, "in_channels": 4, "out_channels": 4, "height": 8, "width": 8, "sequence": 5,
         "hidden": 16, "vocab_size": 100, "latent_channels": 4, "image_channels": 3, "image_height": 32,
         "image_width": 32, "embed_dim": 8, "num_codes": 3, "vae_scale_factor": 4, "latent_multiple": 4}


def test_every_registered_onnx_config_declares_consistent_io():
    from aptp.export.onnx_configs import ONNX_CONFIGS

    assert set(ONNX_CONFIGS) == {"unet", "text_encoder", "vae_decoder", "vae_encoder", "vae_posterior",
                                 "router_encoder", "router_head", "release_router_head"}
    for name, cls in ONNX_CONFIGS.items():
        config = cls(_DIMS)
        assert config.DEFAULT_ONNX_OPSET == 18 and config.ATOL_FOR_VALIDATION == 1e-3
        inputs = config.dummy_inputs()
        assert list(inputs) == list(config.inputs), name
        for input_name, tensor in inputs.items():
            assert tuple(tensor.shape) == config.shape(input_name), (name, input_name)
            assert tensor.dtype == config.input_dtype(input_name), (name, input_name)
        for axes in (*config.inputs.values(), *config.outputs.values()):
            assert set(axes.values()) <= cls.DYNAMIC_DIMS
        assert len(config.validation_dims()) >= 2, name  # every graph is checked at a second size
        profile = config.input_profile(_DIMS, _DIMS, {**_DIMS, "batch": 4})
        assert set(profile) == set(config.inputs)


def test_onnx_config_rejects_uncovered_input_and_missing_sizes():
    from aptp.export.onnx_configs import OnnxConfig, UNetOnnxConfig

    class Broken(OnnxConfig):
        INPUT_SHAPES = {"mystery": ("batch",)}
        OUTPUT_SHAPES = {"out": ("batch",)}

    with pytest.raises(ConfigError, match="mystery"):
        Broken({"batch": 1})
    with pytest.raises(ConfigError, match="hidden"):
        UNetOnnxConfig({k: v for k, v in _DIMS.items() if k != "hidden"})
    with pytest.raises(ConfigError, match="precision"):
        UNetOnnxConfig(_DIMS, precision="int8")


# -- GroupNorm widths for TensorRT -------------------------------------------------------------


@pytest.mark.parametrize("kept, per_group, total, expected", [
    (5, 1, 32, 8),     # 5 channels -> 8
    (8, 1, 32, 8),     # already aligned
    (5, 10, 32, 8),    # SD 2.1's 320-wide blocks: 50 -> 80 channels
    (3, 20, 32, 4),    # 640-wide: 60 -> 80
    (3, 40, 32, 3),    # 1280-wide: 120 is aligned
    (31, 1, 32, 32),   # never past the original count
    (1, 3, 2, 2),      # cannot align within the block: stop at the original count
])
def test_aligned_group_count(kept, per_group, total, expected):
    from aptp.export.tensorrt import aligned_group_count

    assert aligned_group_count(kept, per_group, total) == expected


def test_aligned_group_count_rejects_bad_counts():
    from aptp.export.tensorrt import aligned_group_count, check_group_norm

    with pytest.raises(ConfigError):
        aligned_group_count(33, 1, 32)
    with pytest.raises(ConfigError):
        aligned_group_count(0, 1, 32)
    check_group_norm(4, 40)
    with pytest.raises(ArtifactError, match="divide"):
        check_group_norm(3, 10)


def test_group_norm_padding_keeps_the_expert_output(tiny_checkpoint, components):
    import copy

    from aptp.export import load_expert
    from aptp.export.tensorrt import group_norm_padding_plan, pad_group_norm_widths

    expert = load_expert(tiny_checkpoint / "experts" / "expert_1")
    plan = group_norm_padding_plan(expert, components.unet.config)
    assert plan, "the ~50% expert should keep some unaligned widths"
    padded = copy.deepcopy(expert)
    assert pad_group_norm_widths(padded, components.unet.config) == plan
    for name, module in padded.named_modules():
        if type(module).__name__ == "ResnetBlock2D":
            norm = module.norm2
            assert norm.num_channels % 8 == 0 or norm.num_groups == 32, name
            assert module.conv1.out_channels == norm.num_channels == module.conv2.in_channels
    sample, timestep, context = _unet_inputs(batch=2, width=16)
    with torch.no_grad():
        want = expert(sample, timestep, context).sample
        got = padded(sample, timestep, context).sample
    assert (got - want).abs().max() < 1e-5
    assert sum(p.numel() for p in padded.parameters()) > sum(p.numel() for p in expert.parameters())


def test_engine_step_pads_validates_and_profiles(monkeypatch, tiny_checkpoint, tmp_path, components):
    """The exporter's TensorRT step up to the builder call (the builder itself is faked: no
    TensorRT here): padded graph validated against the unpadded expert, profile over batch
    1..2*max_batch and the resolution range, padding recorded."""
    from aptp.export import exporter
    from aptp.export.tensorrt import Engine, group_norm_padding_plan

    calls = []

    def fake_build(self, onnx_path, input_profile, *, fp16=True, timing_cache=None, workspace_bytes=None):
        calls.append({"onnx": Path(onnx_path), "profile": input_profile, "fp16": fp16, "exists": Path(onnx_path).is_file()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"plan")
        return self.path

    monkeypatch.setattr(Engine, "build", fake_build)
    info, layout, logits, masks, shares = exporter._read_checkpoint(tiny_checkpoint)
    ctx = exporter._Context(checkpoint=tiny_checkpoint, staging=tmp_path, options=exporter.ExportOptions(max_batch=3),
                            info=info, layout=layout, code_logits=logits, hard_masks=masks, shares=shares,
                            components=components, latent_height=16, latent_width=16, latent_range=(8, 32),
                            text_length=32, trt={"built": True})
    expert, _, _ = exporter.load_checkpoint_expert(ctx, 1)
    entry = exporter.build_unet_engine(ctx, "expert 1", expert, tmp_path / "experts" / "expert_1")
    assert entry["tensorrt"] == "experts/expert_1/unet.plan" and (tmp_path / entry["tensorrt"]).is_file()
    assert entry["group_norm_padding"] == group_norm_padding_plan(expert) != []
    (call,) = calls
    assert call["exists"] and call["fp16"] and not call["onnx"].exists()  # scratch graph removed afterwards
    assert call["profile"]["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (6, 4, 32, 32))
    assert call["profile"]["encoder_hidden_states"] == ((1, 32, 64), (2, 32, 64), (6, 32, 64))
    assert ctx.trt["profile"]["max"]["batch"] == 6


@pytest.mark.skipif(not _trt()[0], reason=f"TensorRT engines cannot be built here: {_trt()[1]}")
def test_tensorrt_engine_matches_pytorch(tiny_checkpoint, tmp_path):
    from aptp.export import load_expert
    from aptp.export.onnx_configs import UNetOnnxConfig
    from aptp.export.onnx_export import export_and_validate
    from aptp.export.tensorrt import Engine, pad_group_norm_widths

    expert = load_expert(tiny_checkpoint / "experts" / "expert_1")
    padded = load_expert(tiny_checkpoint / "experts" / "expert_1")
    pad_group_norm_widths(padded)
    config = UNetOnnxConfig.from_unet(padded, 16, 16, 32)
    graph = export_and_validate(padded, config, tmp_path / "unet.onnx")
    low = {"batch": 1, "steps": 1, "height": 8, "width": 8}
    high = {"batch": 4, "steps": 4, "height": 32, "width": 32}
    engine = Engine(tmp_path / "unet.plan")
    engine.build(graph.path, config.input_profile(low, config.dims, high), fp16=True,
                 timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").is_file()
    engine.load()
    engine.activate()
    sample, timestep, context = _unet_inputs(batch=2, width=16)
    engine.allocate_buffers({"sample": sample.shape, "timestep": timestep[:2].shape,
                             "encoder_hidden_states": context[:2].shape})
    stream = torch.cuda.current_stream()
    out = engine.infer({"sample": sample.cuda(), "timestep": timestep[:2].cuda(),
                        "encoder_hidden_states": context[:2].cuda()}, stream.cuda_stream)["out_sample"]
    stream.synchronize()
    with torch.no_grad():
        want = expert(sample, timestep[:2], context[:2]).sample
    assert (out.float().cpu() - want).abs().max() < config.ATOL_FOR_VALIDATION_FP16
    engine.unload()


# -- manifest integrity (torch-free) -----------------------------------------------------------


def _fake_export(root: Path) -> Path:
    (root / "experts" / "expert_0").mkdir(parents=True)
    (root / "experts" / "expert_0" / "unet.onnx").write_bytes(b"graph bytes")
    (root / "notes.txt").write_text("hello")
    write_manifest(root, {"num_codes": 1, "experts": [{"code": 0, "unet": "experts/expert_0/unet.onnx"}]})
    return root


def test_read_manifest_accepts_complete_and_rejects_tampered_exports(tmp_path):
    root = _fake_export(tmp_path / "A")
    manifest = read_manifest(root)
    assert set(manifest["files"]) == {"experts/expert_0/unet.onnx", "notes.txt"}

    (root / "notes.txt").write_text("HELLO")
    with pytest.raises(ArtifactError, match="sha256"):
        read_manifest(root)
    assert read_manifest(root, verify=False)["num_codes"] == 1

    (root / "notes.txt").unlink()
    with pytest.raises(ArtifactError, match="notes.txt is missing"):
        read_manifest(root, verify=False)

    other = _fake_export(tmp_path / "B")
    data = json.loads((other / "manifest.json").read_text())
    data["format_version"] = 2
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="version 2"):
        read_manifest(other)

    data["format_version"], data["files"]["../outside"] = 1, "0" * 64
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="unsafe path"):
        read_manifest(other)

    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        read_manifest(tmp_path / "nothing-here")


def test_write_manifest_refuses_entries_for_unwritten_files(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="b.onnx"):
        write_manifest(tmp_path, {"experts": [{"code": 0, "unet": "b.onnx"}]})
    assert not (tmp_path / "manifest.json").exists()


def test_manifest_module_does_not_import_torch():
    code = "import sys, aptp.export.manifest, aptp.export; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- interrupted exports -----------------------------------------------------------------------


def _interrupt_midway(monkeypatch):
    """Make the expert step write a file into the staging directory, then get Ctrl-C."""
    from aptp.export import exporter

    def interrupted(ctx):
        (ctx.staging / "experts").mkdir()
        (ctx.staging / "experts" / "half.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "export_experts", interrupted)


def test_interrupted_export_leaves_nothing_at_the_target(monkeypatch, tiny_checkpoint, tmp_path, capsys):
    from aptp.export.cli import main

    _interrupt_midway(monkeypatch)
    target = tmp_path / "out" / "A"
    assert main(["--checkpoint", str(tiny_checkpoint), "--output", str(target)]) == 130
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no staging directory left behind
    assert "interrupted" in capsys.readouterr().err
    with pytest.raises(ArtifactError):
        read_manifest(target)


def test_interrupted_export_keeps_the_old_export(monkeypatch, tiny_checkpoint, tmp_path):
    from aptp.export import exporter

    old = _fake_export(tmp_path / "A")
    before = read_manifest(old)
    _interrupt_midway(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_checkpoint(tiny_checkpoint, old, overwrite=True)
    assert read_manifest(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A"]


def test_commit_replaces_an_old_export_whole(tmp_path):
    from aptp.outputs import EXPORT, commit_dir

    old = _fake_export(tmp_path / "A")
    new = tmp_path / ".A.partial-x"
    new.mkdir()
    (new / "only-new.txt").write_text("new")
    write_manifest(new, {"num_codes": 1})
    commit_dir(new, old, EXPORT)
    assert sorted(p.name for p in old.iterdir()) == ["manifest.json", "only-new.txt"]
    assert read_manifest(old)["files"] == {"only-new.txt": read_manifest(old)["files"]["only-new.txt"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A"]


def test_stale_siblings_of_killed_exports_are_cleaned(tmp_path):
    from aptp.outputs import clean_stale_siblings

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "A"
    stale = tmp_path / f".A.partial-{dead.pid}-abc"
    stale.mkdir()
    (stale / "half.onnx").write_bytes(b"half")
    live = tmp_path / f".A.partial-{os.getpid()}-def"  # a running export's staging: kept
    live.mkdir()
    aside = tmp_path / f".A.old-{dead.pid}-ghi"
    _fake_export(aside / "A")  # killed between "old aside" and "new in"
    clean_stale_siblings(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["A", live.name])
    read_manifest(target)


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_checkpoint_shares_and_consistency(tiny_checkpoint, tmp_path):
    from aptp.export.exporter import _read_checkpoint

    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    assert _read_checkpoint(ckpt)[4] == [0.5, 0.5]  # checkpoint.json's training share
    (ckpt / "routing.json").write_text(json.dumps({"format": 1, "share": [0.25, 0.75]}))
    assert _read_checkpoint(ckpt)[4] == [0.25, 0.75]  # routing.json wins
    data = json.loads((ckpt / "checkpoint.json").read_text())
    data["num_codes"] = 3
    (ckpt / "checkpoint.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="K=3"):
        _read_checkpoint(ckpt)


def test_expert_without_directory_is_sliced_and_mismatched_spec_rejected(tiny_checkpoint, tmp_path, components):
    import shutil

    from aptp.export import load_expert
    from aptp.export.exporter import ExportOptions, _Context, _read_checkpoint, load_checkpoint_expert

    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    info, layout, logits, masks, shares = _read_checkpoint(ckpt)
    ctx = _Context(checkpoint=ckpt, staging=tmp_path, options=ExportOptions(), info=info, layout=layout,
                   code_logits=logits, hard_masks=masks, shares=shares, components=components)
    shutil.rmtree(ckpt / "experts" / "expert_0")
    unet, spec, expert_info = load_checkpoint_expert(ctx, 0)
    want = load_expert(tiny_checkpoint / "experts" / "expert_0").state_dict()
    got = unet.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert expert_info["finetuned"] is False
    # An expert directory sliced from another code is refused.
    (ckpt / "experts" / "expert_1").rename(ckpt / "experts" / "expert_0")
    with pytest.raises(ArtifactError, match="does not match code 0"):
        load_checkpoint_expert(ctx, 0)


# -- bad input ---------------------------------------------------------------------------------


def _run_cli(args, capsys) -> tuple[int, str]:
    from aptp.export.cli import main

    rc = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_error_line(err: str) -> str:
    # Third-party progress bars may share stderr; aptp-export itself prints one line.
    lines = [line for line in err.splitlines() if line.startswith("aptp-export")]
    assert len(lines) == 1 and lines[0].startswith("aptp-export: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_checkpoint(tmp_path, capsys):
    rc, err = _run_cli(["--checkpoint", tmp_path / "nope", "--output", tmp_path / "A"], capsys)
    assert rc == 2 and "does not exist" in _one_error_line(err)
    assert not (tmp_path / "A").exists()


def test_checkpoint_of_another_format(tmp_path, tiny_checkpoint, capsys):
    data = json.loads((tiny_checkpoint / "checkpoint.json").read_text())
    data["format"] = 99
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint.json").write_text(json.dumps(data))
    rc, err = _run_cli(["--checkpoint", tmp_path / "old", "--output", tmp_path / "A"], capsys)
    assert rc == 2 and "format 99" in _one_error_line(err)


def test_unwritable_output(tmp_path, tiny_checkpoint, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, err = _run_cli(["--checkpoint", tiny_checkpoint, "--output", blocker / "A"], capsys)
    assert rc == 2 and "not a directory" in _one_error_line(err)
    rc, err = _run_cli(["--checkpoint", tiny_checkpoint, "--output", blocker], capsys)
    assert rc == 2 and "not a directory" in _one_error_line(err)


def test_unknown_scheduler(tmp_path, tiny_checkpoint, capsys):
    rc, err = _run_cli(["--checkpoint", tiny_checkpoint, "--output", tmp_path / "A", "--scheduler", "heun"], capsys)
    assert rc == 2 and "unknown scheduler 'heun'" in _one_error_line(err)
    rc, err = _run_cli(["--checkpoint", tiny_checkpoint, "--output", tmp_path / "A", "--scheduler", "euler_a"], capsys)
    assert rc == 2 and "stochastic" in _one_error_line(err)
    assert not (tmp_path / "A").exists()


def test_resolution_off_the_model_grid_cleans_up(tmp_path, tiny_checkpoint, capsys):
    rc, err = _run_cli(["--checkpoint", tiny_checkpoint, "--output", tmp_path / "A", "--resolution", "72"], capsys)
    assert rc == 2 and "multiple of 16" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []
