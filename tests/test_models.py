"""aptp.train.models: the tiny pipeline, loading through from_pretrained, load errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aptp.errors import ConfigError
from aptp.train import models
from aptp.train.models import DiffusionComponents, build_tiny_pipeline, load_components, resolve_pretrained


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> DiffusionComponents:
    return load_components(str(tiny_dir))


@pytest.fixture
def offline(monkeypatch):
    """Hub look-ups fail at once instead of retrying a network that is not there."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_pipeline_directory_layout(tiny_dir):
    assert (tiny_dir / "model_index.json").is_file()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_dir / sub).is_dir(), sub
    size = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert size < 40e6, f"tiny pipeline is {size / 1e6:.1f} MB"


def test_unet_is_sd21_shaped(tiny):
    config = tiny.unet.config
    assert tuple(config.down_block_types) == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert tuple(config.up_block_types) == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert config.use_linear_projection and config.layers_per_block == 2
    assert config.norm_num_groups == 32 and all(c % 32 == 0 for c in config.block_out_channels)
    assert config.cross_attention_dim == tiny.text_encoder.config.hidden_size
    heads = {m.heads for m in tiny.unet.modules() if type(m).__name__ == "Attention"}
    assert heads and min(heads) >= 2, heads


def test_unet_forward_shape(tiny):
    sample_size = tiny.unet.config.sample_size
    assert sample_size * tiny.vae_scale_factor == 64
    latents = torch.randn(2, 4, sample_size, sample_size)
    context = torch.randn(2, tiny.text_length, tiny.unet.config.cross_attention_dim)
    with torch.no_grad():
        out = tiny.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context).sample
    assert out.shape == latents.shape
    assert torch.isfinite(out).all()


def test_vae_factor_and_latent_scale(tiny):
    assert tiny.vae_scale_factor == 4
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = tiny.vae.encode(images).latent_dist.mean * tiny.vae.config.scaling_factor
    assert latents.shape == (2, 4, 16, 16)
    # The scaling factor is calibrated on smooth images; noise images land within a few x of 1.
    assert 0.1 < latents.std().item() < 10


def test_tokenizer_and_text_encoder_agree(tiny):
    tokenizer, config = tiny.tokenizer, tiny.text_encoder.config
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.pad_token_id == config.pad_token_id
    assert tokenizer.sep_token_id == config.eos_token_id
    assert tokenizer.model_max_length == config.max_position_embeddings == 32


def test_encode_prompts_shape_and_content(tiny):
    long_prompt = " ".join(["a very long prompt about a red bicycle"] * 20)
    states = tiny.encode_prompts(["a photo of a cat", "a painting of a dog", long_prompt], "cpu")
    assert states.shape == (3, 32, tiny.text_encoder.config.hidden_size)
    assert not torch.allclose(states[0], states[1])
    ids = tiny.tokenize(["a photo of a cat"])
    assert ids.shape == (1, 32) and ids[0, 0].item() == tiny.tokenizer.cls_token_id


def test_noise_scheduler_is_ddpm_from_the_pipeline_config(tiny):
    from diffusers import DDPMScheduler

    scheduler = tiny.noise_scheduler
    assert isinstance(scheduler, DDPMScheduler)
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_start == pytest.approx(0.00085)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny):
    again = load_components(str(build_tiny_pipeline(tmp_path / "a", seed=0)))
    other = load_components(str(build_tiny_pipeline(tmp_path / "b", seed=1)))
    reference = tiny.unet.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in again.unet.state_dict().items())
    assert any(not torch.equal(reference[k], v) for k, v in other.unet.state_dict().items())


def test_stable_diffusion_pipeline_loads_it(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_resolve_tiny_builds_once_into_cache(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("APTP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "TINY_WEIGHTS", tmp_path / "no-committed-weights")
    calls = []

    def fake_build(directory, seed=0):
        calls.append(Path(directory))
        (Path(directory) / "model_index.json").write_text("{}")
        return Path(directory)

    monkeypatch.setattr(models, "build_tiny_pipeline", fake_build)
    first = resolve_pretrained("tiny")
    second = resolve_pretrained("tiny")
    assert first == second and Path(first).parent == tmp_path
    assert len(calls) == 1 and calls[0] != Path(first)  # built elsewhere, then renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(first).name]


def test_killed_build_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("APTP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "TINY_WEIGHTS", tmp_path / "no-committed-weights")

    def failing_build(directory, seed=0):
        (Path(directory) / "unet").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "build_tiny_pipeline", failing_build)
    with pytest.raises(KeyboardInterrupt):
        resolve_pretrained("tiny")
    assert list(tmp_path.iterdir()) == []


def test_committed_tiny_weights_are_preferred(tmp_path, monkeypatch):
    committed = tmp_path / "assets" / "tiny-sd"
    committed.mkdir(parents=True)
    (committed / "model_index.json").write_text("{}")
    monkeypatch.setattr(models, "TINY_WEIGHTS", committed)
    monkeypatch.setenv("APTP_CACHE_DIR", str(tmp_path / "cache"))
    assert resolve_pretrained("tiny") == str(committed)
    assert not (tmp_path / "cache").exists()


def test_load_components_accepts_tiny(monkeypatch, tiny_dir):
    monkeypatch.setattr(models, "TINY_WEIGHTS", tiny_dir)  # stands in for the built pipeline
    components = load_components("tiny")
    assert components.pretrained == str(tiny_dir)
    assert components.unet.config.sample_size == 16


def test_other_names_pass_through():
    assert resolve_pretrained("stabilityai/stable-diffusion-2-1") == "stabilityai/stable-diffusion-2-1"
    assert resolve_pretrained("/data/sd21") == "/data/sd21"


def test_missing_local_path_is_a_config_error(tmp_path, offline):
    missing = tmp_path / "no" / "such" / "pipeline"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_components(str(missing))
    assert str(missing) in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_directory_without_unet_is_a_config_error(tmp_path, offline):
    with pytest.raises(ConfigError, match="not a diffusers pipeline directory"):
        load_components(str(tmp_path))


def test_unreachable_hub_id_is_a_config_error(offline):
    with pytest.raises(ConfigError, match="cannot load model.pretrained 'aptp-test/no-such-model'") as info:
        load_components("aptp-test/no-such-model")
    assert "HF_HUB_OFFLINE" in str(info.value)
