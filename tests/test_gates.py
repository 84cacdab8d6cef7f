"""Gate sites, masking and slicing: the masked full UNet equals the sliced dense UNet."""

from __future__ import annotations

import pytest
import torch
from conftest import UNET_CONFIGS, make_unet
from diffusers.models.attention import FeedForward

from aptp.train.gates import GATE_KINDS, GateLayout, apply_gates
from aptp.train.slicing import ArchSpec, build_expert_structure, slice_unet


def random_hard_mask(layout: GateLayout, generator: torch.Generator, keep: float = 0.5, kinds=None) -> torch.Tensor:
    """Random 0/1 gates (only at sites of `kinds`, others kept); width sites keep >= 1 unit."""
    mask = torch.ones(layout.num_gates)
    for i, site in enumerate(layout.sites):
        if kinds is not None and site.kind not in kinds:
            continue
        values = (torch.rand(site.num_units, generator=generator) < keep).float()
        if layout.site_nonempty[i] and values.sum() == 0:
            values[torch.randint(site.num_units, (1,), generator=generator)] = 1.0
        mask[layout.site_slice(site)] = values
    return mask


def unet_inputs(name: str, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = UNET_CONFIGS[name]
    sample = torch.randn(batch, cfg["in_channels"], 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g)
    return sample, t, context


def test_every_registered_kind_finds_sites(unet_name):
    unet = make_unet(unet_name)
    layout = GateLayout.from_unet(unet, ff_groups=4, depth=True)
    found = layout.summary()
    assert set(found) == set(GATE_KINDS), f"kinds without a site: {set(GATE_KINDS) - set(found)}"
    for site in layout.sites:
        module = unet.get_submodule(site.name)
        assert any(isinstance(module, t) for t in GATE_KINDS[site.kind].module_types)


def test_sites_are_found_by_walking_not_by_name(unet_name):
    unet = make_unet(unet_name)
    layout = GateLayout.from_unet(unet, ff_groups=4)
    resnets = [n for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    attns = [n for n, m in unet.named_modules() if type(m).__name__ == "Attention"]
    assert [s.name for s in layout.sites if s.kind == "resnet"] == resnets
    assert [s.name for s in layout.sites if s.kind == "attention"] == attns
    heads = {s.name: s.num_units for s in layout.sites if s.kind == "attention"}
    assert all(heads[n] == unet.get_submodule(n).heads for n in attns)


@pytest.mark.parametrize("kinds", [("resnet",), ("attention",), ("feedforward",), ("depth",), None])
def test_masked_equals_sliced(unet_name, kinds):
    torch.manual_seed(0)
    unet = make_unet(unet_name)
    layout = GateLayout.from_unet(unet, ff_groups=4, depth=True)
    # A fixed seed per case (str hashes are salted per process).
    seed = sorted(UNET_CONFIGS).index(unet_name) * 10 + (len(kinds[0]) if kinds else 0)
    g = torch.Generator().manual_seed(seed)
    for trial in range(2):
        mask = random_hard_mask(layout, g, keep=0.3 + 0.3 * trial, kinds=kinds)
        sliced, spec = slice_unet(unet, layout, mask)
        sample, t, context = unet_inputs(unet_name, batch=2, seed=trial)
        with torch.no_grad():
            with apply_gates(unet, layout, mask):
                masked = unet(sample, t, encoder_hidden_states=context).sample
            dense_small = sliced(sample, t, encoder_hidden_states=context).sample
            full = unet(sample, t, encoder_hidden_states=context).sample
        err = (masked - dense_small).abs().max().item()
        assert err < 1e-4, f"masked vs sliced max abs error {err} ({kinds}, trial {trial})"
        # The mask must have changed something, or the comparison proves nothing.
        assert (masked - full).abs().max().item() > 1e-3
        assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in unet.parameters())


def test_per_sample_masks_and_guidance_batch():
    unet = make_unet("multi_layer")
    layout = GateLayout.from_unet(unet, ff_groups=4)
    g = torch.Generator().manual_seed(3)
    masks = torch.stack([random_hard_mask(layout, g), random_hard_mask(layout, g)])
    sample, t, context = unet_inputs("multi_layer", batch=4)  # [uncond; cond] for 2 prompts
    t = t[:2].repeat(2)
    with torch.no_grad(), apply_gates(unet, layout, masks):
        both = unet(sample, t, encoder_hidden_states=context).sample
    for i in range(2):
        rows = [i, i + 2]
        with torch.no_grad(), apply_gates(unet, layout, masks[i]):
            alone = unet(sample[rows], t[rows], encoder_hidden_states=context[rows]).sample
        assert (both[rows] - alone).abs().max() < 1e-5


def test_gates_leave_no_hooks_behind():
    unet = make_unet("single_layer")
    layout = GateLayout.from_unet(unet)
    sample, t, context = unet_inputs("single_layer", batch=1)
    with torch.no_grad():
        before = unet(sample, t, encoder_hidden_states=context).sample
        with apply_gates(unet, layout, torch.zeros(layout.num_gates)):
            pass
        after = unet(sample, t, encoder_hidden_states=context).sample
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="gates must have shape"):
        with apply_gates(unet, layout, torch.ones(layout.num_gates + 1)):
            pass


def test_soft_gates_are_differentiable():
    unet = make_unet("multi_layer")
    layout = GateLayout.from_unet(unet, ff_groups=4)
    gates = torch.full((2, layout.num_gates), 0.7, requires_grad=True)
    sample, t, context = unet_inputs("multi_layer", batch=2)
    with apply_gates(unet, layout, gates):
        out = unet(sample, t, encoder_hidden_states=context).sample
    out.square().mean().backward()
    grad = gates.grad.abs()
    for site in layout.sites:
        assert grad[:, layout.site_slice(site)].sum() > 0, f"no gradient reaches {site.kind} gates of {site.name}"


@pytest.mark.parametrize("activation", ["gelu", "geglu"])
def test_feedforward_activations(activation):
    torch.manual_seed(0)
    block = torch.nn.Sequential(FeedForward(16, mult=4, activation_fn=activation)).eval()
    layout = GateLayout.from_unet(block, ff_groups=8, depth=False)
    assert layout.summary() == {"feedforward": 1}
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.float)
    x = torch.randn(3, 5, 16)
    with torch.no_grad(), apply_gates(block, layout, mask):
        masked = block(x)
    sliced, spec = slice_unet(block, layout, mask)
    assert spec.sites[0]["inner_dim"] == 32
    assert (masked - sliced(x)).abs().max() < 1e-5


def test_arch_spec_rebuilds_expert(tmp_path, unet_name):
    unet = make_unet(unet_name)
    layout = GateLayout.from_unet(unet, ff_groups=4)
    mask = random_hard_mask(layout, torch.Generator().manual_seed(5))
    sliced, spec = slice_unet(unet, layout, mask)
    spec.save(tmp_path / "arch_spec.json")
    rebuilt = build_expert_structure(dict(unet.config), ArchSpec.load(tmp_path / "arch_spec.json"))
    rebuilt.load_state_dict(sliced.state_dict(), strict=True)
    sample, t, context = unet_inputs(unet_name, batch=1)
    with torch.no_grad():
        a = sliced(sample, t, encoder_hidden_states=context).sample
        b = rebuilt.eval()(sample, t, encoder_hidden_states=context).sample
    assert torch.equal(a, b)


def test_expert_save_and_load_round_trip(tmp_path):
    from aptp.errors import ArtifactError
    from aptp.train.experts import load_expert, save_expert

    unet = make_unet("multi_layer")
    layout = GateLayout.from_unet(unet, ff_groups=4)
    mask = random_hard_mask(layout, torch.Generator().manual_seed(9))
    sliced, spec = slice_unet(unet, layout, mask)
    save_expert(tmp_path / "expert_0", sliced, spec, unet.config, info={"code": 0})
    loaded = load_expert(tmp_path / "expert_0")
    sample, t, context = unet_inputs("multi_layer", batch=2)
    with torch.no_grad():
        assert torch.equal(sliced(sample, t, encoder_hidden_states=context).sample,
                           loaded(sample, t, encoder_hidden_states=context).sample)
    (tmp_path / "expert_0" / "arch_spec.json").write_text('{"format": 99}')
    with pytest.raises(ArtifactError, match="format"):
        load_expert(tmp_path / "expert_0")
    with pytest.raises(ArtifactError, match="has no"):
        load_expert(tmp_path / "missing")
