"""aptp-import on a synthetic release written in exactly the authors' layout and formats.

The fixture writes a tiny set (the committed tiny pipeline as the SD-2.1-shaped base, a small
random MPNet, K = 4 codes: one keeping everything, one with every depth gate off), imports it,
and (slow) exports it and generates with the runtime. The routing reference below is written
from the authors' code (`StructureVectorQuantizer.get_cosine_sim_min_encoding_indices` and the
samplers of `pdm/utils/estimation_utils.py`), step by step and independently of
`aptp.train.release.routing`; each slip toggles one step.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

SLIPS = ("no_noise", "strict_threshold", "no_sqrt", "ignore_depth_order", "ignore_non_zero_width",
         "binarize_product")
K = 4
WORDS = ("cat dog horse car tree river mountain house bird flower portrait city harbour street sea sky "
         "astronaut chair table man woman").split()
STYLES = ("a photo of a", "a watercolor painting of a", "an old", "a red", "a small blue", "close up view of a",
          "a bright", "a dark sketch of a")


def _prompts(n: int) -> list[str]:
    return [f"{STYLES[i % len(STYLES)]} {WORDS[(i * 7) % len(WORDS)]} {WORDS[(i * 3 + 1) % len(WORDS)]}"
            for i in range(n)]


# -- the authors' rule, literally (reference) ------------------------------------------------------


def _gumbel(shape: tuple[int, ...]) -> torch.Tensor:
    u = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    return -torch.log(-torch.log(u + 1e-20) + 1e-20)


def _hard(x: torch.Tensor, slip: str | None) -> torch.Tensor:
    return (x > 0.5).float() if slip == "strict_threshold" else (x >= 0.5).float()


def reference_route(emb: torch.Tensor, release: dict, slip: str | None = None) -> torch.Tensor:
    """The authors' inference assignment for each row as batch row 0 (their noise row 0)."""
    structure, T, base = release["structure"], release["temperature"], release["base"]
    width_list = [w for m in structure["width"] for w in m]
    depth_list = [d for m in structure["depth"] for d in m]
    nw, nd = sum(width_list), sum(depth_list)
    heads = release["heads"]
    z = torch.cat([emb @ heads[f"mh_fc.{i}.weight"].T + heads[f"mh_fc.{i}.bias"]
                   for i in range(len(width_list) + 1)], dim=1)

    def noise(width):
        return torch.zeros(1, width) if slip == "no_noise" else _gumbel((1, width))

    def relax(v):
        zw, zd = v[:, :nw], v[:, nw:]
        x = torch.flip(torch.cumsum(torch.softmax(zd, dim=1), dim=1), dims=[1])
        x = torch.log(x + 1e-6) - torch.log1p(-(x - 1e-6))
        sampled = torch.sigmoid((x + noise(nd) + base) / T)
        order = list(range(nd)) if slip == "ignore_depth_order" else [i % nd for i in release["depth_order"]]
        depth = torch.zeros_like(sampled)
        depth[:, order] = sampled
        parts, start = [], 0
        for w in width_list:
            y = torch.sigmoid((zw[:, start:start + w] + noise(w) + base) / T)
            start += w
            if release["non_zero_width"] and slip != "ignore_non_zero_width":
                empty = _hard(y, slip).sum(dim=1) == 0
                y = y.clone()
                y[empty, 0] = y[empty, 0] + 0.5
            parts.append(y)
        return torch.cat(parts + [depth], dim=1)

    def normalize(v):
        out = _hard(v, slip)
        start, depth_index = 0, nw
        for widths, depth in zip(structure["width"], structure["depth"]):
            end = start + sum(widths)
            if depth == [1]:
                product = v[:, start:end] * v[:, depth_index:depth_index + 1]
                out[:, start:end] = _hard(product, slip) if slip == "binarize_product" else product
                depth_index += 1
            start = end
        template = torch.tensor(width_list + [d for d in depth_list if d != 0])
        template = 1.0 / torch.repeat_interleave(template, template).float()
        return out if slip == "no_sqrt" else out * torch.sqrt(template)

    u = normalize(relax(z))
    u = u / u.norm(dim=-1, keepdim=True)
    codes = normalize(release["codes"].clone())
    codes = codes / codes.norm(dim=-1, keepdim=True)
    return torch.argmax(u @ codes.T, dim=-1)


def _mean_pool_embeddings(mpnet: Path, prompts: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(mpnet))
    model = AutoModel.from_pretrained(str(mpnet)).eval()
    tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens)[0]
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


# -- fixture ----------------------------------------------------------------------------------------


def _crafted_hypernet(layout, codes, input_dim):
    """Random heads (see `hypernet_weights`) plus two crafted entries: one whose value is exactly
    0.5 for every prompt (``>=`` vs ``>``) and one group that always samples empty (non-zero fix)."""
    from aptp.train.release.routing import gumbel_row0
    from aptp.train.release.synthetic import hypernet_weights

    heads = hypernet_weights(layout, codes, input_dim, seed=1)
    groups = layout.width_groups
    # The first self-attention group outside depth-gated modules (binarised, not multiplied).
    index = next(i for i, (m, w) in enumerate(_group_modules(layout)) if not m.depth and w < 32)
    exact = heads[f"mh_fc.{index}.weight"], heads[f"mh_fc.{index}.bias"]
    exact[0][1].zero_()
    n = gumbel_row0(groups[index])[1]
    # The float32 bias whose (b + n) + 3 is exactly 0: search a few ulps around -3 - n.
    b = (torch.tensor(-3.0, dtype=torch.float64) - n.double()).float()
    for _ in range(64):
        if float((b + n) + 3.0) == 0.0:
            break
        b = torch.nextafter(b, torch.tensor(-100.0 if float((b + n) + 3.0) > 0 else 100.0))
    assert float(torch.sigmoid(((b + n) + 3.0) / 0.4)) == 0.5
    exact[1][1] = b
    empty = next(i for i, (m, w) in enumerate(_group_modules(layout)) if not m.depth and w < 32 and i != index)
    heads[f"mh_fc.{empty}.weight"].zero_()
    heads[f"mh_fc.{empty}.bias"].fill_(-20.0)
    return heads, index, empty


def _group_modules(layout):
    return [(m, w) for m in layout.modules for w in m.widths]


@pytest.fixture(scope="module")
def release_env(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from aptp.train.models import resolve_pretrained
    from aptp.train.release.cli import main
    from aptp.train.release.layout import AuthorsLayout
    from aptp.train.release.synthetic import code_vectors, write_mpnet, write_release

    root = tmp_path_factory.mktemp("release")
    base = Path(resolve_pretrained("tiny"))
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet").eval()
    mpnet = write_mpnet(root / "mpnet", hidden=32)
    layout = AuthorsLayout(unet)
    codes = code_vectors(layout, K, seed=0)
    heads, exact_group, empty_group = _crafted_hypernet(layout, codes, 32)
    synthetic = write_release(root / "set", unet, 32, num_codes=K, codes=codes, hypernet=heads)
    prompts = _prompts(72)
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    rc = main(["--release", str(root / "set"), "--base", str(base), "--prompt-encoder", str(mpnet),
               "--output", str(root / "ckpt"), "--prompts", str(root / "prompts.txt")])
    assert rc == 0
    quant = json.loads((root / "set" / "quantizer" / "config.json").read_text())
    reference = {"structure": quant["structure"], "temperature": quant["temperature"], "base": quant["base"],
                 "depth_order": quant["depth_order"], "non_zero_width": quant["non_zero_width"],
                 "heads": load_file(str(root / "set" / "hypernet" / "diffusion_pytorch_model.safetensors")),
                 "codes": load_file(str(root / "set" / "quantizer" / "diffusion_pytorch_model.safetensors"))[
                     "embedding_gs"]}
    return {"root": root, "base": base, "unet": unet, "mpnet": mpnet, "layout": layout, "codes": codes,
            "synthetic": synthetic, "prompts": prompts, "ckpt": root / "ckpt", "reference": reference,
            "exact_group": exact_group, "empty_group": empty_group}


@pytest.fixture(scope="module")
def probes(release_env):
    """Per slip, an embedding whose expert under the slip differs from the rule's."""
    ref = release_env["reference"]
    candidates = torch.randn(4000, 32, generator=torch.Generator().manual_seed(5)) * 0.6
    right = reference_route(candidates, ref)
    found = {}
    for slip in SLIPS:
        differs = torch.nonzero(reference_route(candidates, ref, slip) != right).flatten()
        assert differs.numel(), f"no probe embedding separates the rule from the slip {slip}"
        found[slip] = candidates[differs[0]]
    return found


@pytest.fixture(scope="module")
def exported(release_env):
    from aptp.export.cli import main

    out = release_env["root"] / "export"
    assert main(["--checkpoint", str(release_env["ckpt"]), "--output", str(out), "--no-dense", "--steps", "3"]) == 0
    return out


# -- layout ---------------------------------------------------------------------------------------


def test_sd21_layout_has_the_release_dimension():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from aptp.train.release.layout import AuthorsLayout
    from aptp.train.release.synthetic import SD21_UNET_CONFIG

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SD21_UNET_CONFIG)
    layout = AuthorsLayout(unet)
    assert (layout.num_width, layout.num_depth, layout.dim) == (1606, 14, 1620)
    gated = [m.name for m in layout.modules if m.depth]
    assert gated[:2] == ["down_blocks.0.resnets.1", "down_blocks.0.attentions.1"]
    assert "mid_block.resnets.1" not in gated and "up_blocks.0.resnets.2" in gated
    assert sorted(layout.to_aptp.tolist()) == list(range(1620))


# -- import ---------------------------------------------------------------------------------------


def test_imported_experts_equal_the_masked_perturbed_base(release_env):
    from aptp.train.checkpoint import load_codes, load_layout
    from aptp.train.experts import load_expert
    from aptp.train.gates import apply_gates
    from aptp.train.release.synthetic import perturbed_state

    ckpt, unet = release_env["ckpt"], release_env["unet"]
    _, masks = load_codes(ckpt)
    layout = load_layout(ckpt)
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 32, 64, generator=g)
    timesteps = torch.tensor([10, 700])
    worst = []
    try:
        for code in range(K):
            expert = load_expert(ckpt / "experts" / f"expert_{code}")
            unet.load_state_dict(perturbed_state(base_state, code))
            with torch.no_grad():
                got = expert(sample, timesteps, encoder_hidden_states=context).sample
                with apply_gates(unet, layout, masks[code].float()):
                    want = unet(sample, timesteps, encoder_hidden_states=context).sample
            worst.append(float((got - want).abs().max()))
            assert worst[-1] < 1e-5 * max(1.0, float(want.abs().max())), (code, worst)
    finally:
        unet.load_state_dict(base_state)
    # Code 0 keeps everything; code 1 skips every depth-gated module.
    assert bool(masks[0].all())
    depth = [s for s in layout.sites if s.kind == "depth"]
    assert all(not bool(masks[1][s.offset]) for s in depth) and depth


def test_import_records_provenance_and_macs(release_env):
    ckpt = release_env["ckpt"]
    info = json.loads((ckpt / "checkpoint.json").read_text())
    release = json.loads((ckpt / "release.json").read_text())
    assert info["num_codes"] == K and len(info["code_macs_ratio"]) == K and info["code_macs_ratio"][0] == 1.0
    assert all(0.0 < r < 1.0 for r in info["code_macs_ratio"][1:])
    assert abs(sum(info["code_share"]) - 1.0) < 1e-9
    assert release["format"] == "aptp-release-import" and release["num_codes"] == K
    assert release["layout_version"].startswith("rezashkv/diffusion_pruning@")
    assert [e["step"] for e in release["experts"]] == release_env["synthetic"].steps
    expert = json.loads((ckpt / "experts" / "expert_2" / "expert.json").read_text())
    assert expert["source"] == "release" and expert["finetuned"] is True
    assert not (ckpt / "router_head").exists() and (ckpt / "release_router" / "config.json").is_file()


def test_import_prints_macs_parameters_sizes_and_shares(release_env, tmp_path, capsys):
    from aptp.train.release.cli import main

    env = release_env
    rc = main(["--release", str(env["root"] / "set"), "--base", str(env["base"]), "--prompt-encoder",
               str(env["mpnet"]), "--output", str(tmp_path / "again"), "--prompts", str(env["root"] / "prompts.txt")])
    out = capsys.readouterr().out
    assert rc == 0 and out.count(" MACs ") == K and "parameters" in out and "MiB" in out and "prompt share" in out


def test_torch_router_matches_reference_and_probes(release_env, probes):
    from aptp.train.release.importer import load_release_router

    head, _ = load_release_router(release_env["ckpt"])
    ref = release_env["reference"]
    emb = _mean_pool_embeddings(release_env["mpnet"], release_env["prompts"])
    with torch.no_grad():
        assert torch.equal(head.route(emb), reference_route(emb, ref))
        batch = torch.stack(list(probes.values()))
        assert torch.equal(head.route(batch), reference_route(batch, ref))
    # Routing does not depend on the batch: each row alone gives the same expert.
    with torch.no_grad():
        alone = torch.cat([head.route(e[None]) for e in emb[:8]])
    assert torch.equal(alone, head.route(emb[:8]))


# -- refusals -------------------------------------------------------------------------------------


def _arch(root: Path, code: int) -> Path:
    return next((root / f"arch{code}").glob("checkpoint-*"))


def _edit_weights(root: Path, code: int, edit) -> None:
    path = _arch(root, code) / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _first_key(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


def _pickle_object(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(Path("/etc/passwd"), f)


MUTATIONS = {
    "missing expert folder": (lambda r: shutil.rmtree(r / "arch2"), ["expert 2", "arch2"]),
    "wrong shape": (lambda r: _edit_weights(r, 1, lambda t: t.__setitem__(
        _first_key(t, "resnets.0.conv1.weight"), torch.zeros(5, 4, 3, 3))), ["expert 1", "conv1.weight", "[5, 4, 3, 3]"]),
    "extra key": (lambda r: _edit_weights(r, 3, lambda t: t.__setitem__("mid_block.extra.weight", torch.zeros(2))),
                  ["expert 3", "mid_block.extra.weight"]),
    "missing key": (lambda r: _edit_weights(r, 0, lambda t: t.pop("conv_out.weight")), ["expert 0", "conv_out.weight"]),
    "arch vector differs": (lambda r: torch.save(torch.full((1, 994), 0.9), _arch(r, 2) / "arch_vector.pt"),
                            ["expert 2", "embedding_gs[2]"]),
    "arch vector not a tensor": (lambda r: torch.save({"arch": [1, 2]}, _arch(r, 1) / "arch_vector.pt"),
                                 ["arch_vector.pt", "dict"]),
    "arch vector an arbitrary pickle": (lambda r: _pickle_object(_arch(r, 1) / "arch_vector.pt"),
                                        ["arch_vector.pt", "weights_only"]),
    "K mismatch (extra folder)": (lambda r: shutil.copytree(r / "arch0", r / "arch4"), ["K=4", "arch4"]),
    "K mismatch (quantizer n_e)": (lambda r: (r / "quantizer" / "config.json").write_text(
        (r / "quantizer" / "config.json").read_text().replace('"n_e": 4', '"n_e": 5')), ["quantizer", "[5, 994]"]),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_refusals_exit_2_with_one_line_and_write_nothing(release_env, tmp_path, capsys, name):
    from aptp.train.release.cli import main

    mutate, words = MUTATIONS[name]
    release = tmp_path / "set"
    shutil.copytree(release_env["root"] / "set", release)
    mutate(release)
    output = tmp_path / "out" / "ckpt"
    rc = main(["--release", str(release), "--base", str(release_env["base"]), "--prompt-encoder",
               str(release_env["mpnet"]), "--output", str(output)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("aptp-import: error:"), err
    for word in words:
        assert word in err, (word, err)
    assert not output.exists()
    assert not output.parent.exists() or not any(output.parent.iterdir())


# -- export and runtime (slow) --------------------------------------------------------------------


@pytest.mark.slow
def test_runtime_routes_like_the_authors_rule(release_env, exported, probes):
    import onnxruntime as ort

    from aptp.runtime.pipeline import AptpPipeline

    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["router"]["kind"] == "authors" and manifest["router"]["encoder"]["normalized"] is False
    prompts = release_env["prompts"]
    want = reference_route(_mean_pool_embeddings(release_env["mpnet"], prompts), release_env["reference"])
    pipe = AptpPipeline.from_export(exported)
    got = pipe.route(prompts)
    assert len(prompts) >= 64 and got.tolist() == want.tolist()
    assert len(set(got.tolist())) >= 2
    # Each slip would change the expert of its probe; the exported head picks the rule's.
    session = ort.InferenceSession(str(exported / "router" / "head.onnx"), providers=["CPUExecutionProvider"])
    for slip, probe in probes.items():
        scores = session.run(None, {"sentence_embedding": probe[None].numpy()})[0]
        rule = int(reference_route(probe[None], release_env["reference"])[0])
        assert int(np.argmax(scores[0])) == rule, slip
        assert int(reference_route(probe[None], release_env["reference"], slip)[0]) != rule, slip


@pytest.mark.slow
def test_generate_runs_on_the_imported_experts(release_env, exported, tmp_path):
    from aptp.runtime.cli import main

    out = tmp_path / "img.png"
    rc = main(["--artifacts", str(exported), "--prompt", release_env["prompts"][0], "--prompt",
               release_env["prompts"][3], "--output", str(out), "--steps", "2"])
    assert rc == 0
    assert (tmp_path / "img_0.png").is_file() and (tmp_path / "img_1.png").is_file()
