"""The AUTOMATIC1111 web UI API subset that ``aptp-serve`` speaks (both modes): parsing and responses.

    POST /sdapi/v1/txt2img   {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler_name",
                              "width", "height", "batch_size", "n_iter"}
        -> {"images": [base64 PNG...], "parameters": {...}, "info": "<JSON string>"}
    POST /sdapi/v1/img2img   the same fields plus "init_images" (one base64 image), "denoising_strength",
                              "mask" (base64, white repaints), "mask_blur" (default 4), "inpainting_mask_invert"
    GET  /sdapi/v1/samplers, /sdapi/v1/sd-models, /sdapi/v1/options (POST: what aptp can honour)

``info`` holds A1111's usual keys (``all_seeds``, ``infotexts``...) and aptp's per image under
``"aptp"``: expert, MACs ratio, UNet bytes, provider, batch size, timings, seed. Fields A1111
knows and aptp cannot honour (hires fix, face restoration, tiling, styles, scripts, subseeds,
an ancestral or Karras sampler) are refused with 422 rather than silently dropped; fields
neither knows are ignored, as A1111 does. Every refusal is one line,
``{"error": "<reason>", "detail": "<what is wrong>"}``. The HTTP dispatch is
`aptp.runtime.http_app`; nothing here does I/O.
"""

from __future__ import annotations

import base64
import json
import numbers
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from aptp import __version__
from aptp.errors import RuntimeInputError, shown

from .artifacts import DENSE
from .pipeline import AptpPipeline, GenerationOptions, GenerationResult
from .request_options import MAX_SEED
from .sampler_library import canonical_sampler
from .serve_http import HttpError, load_json
from .tokenize import check_text

__all__ = ["A1111_SAMPLERS", "MAX_IMAGES", "UNSUPPORTED_FIELDS", "Txt2ImgRequest", "model_title", "options",
           "parse_txt2img", "samplers", "sd_models", "set_options", "txt2img_response", "unprocessable"]

#: A1111's sampler names -> aptp's (those an export lists are offered; PNDM only where exported).
A1111_SAMPLERS = {"Euler": "euler", "DDIM": "ddim", "DPM++ 2M": "dpmpp_2m", "PLMS": "pndm", "PNDM": "pndm"}
_ALIASES = {"euler": ["k_euler"], "ddim": [], "dpmpp_2m": ["k_dpmpp_2m"], "pndm": ["plms"]}
#: Images per txt2img request (batch_size x n_iter): each one is a request to the server's queue.
MAX_IMAGES = 32
MAX_BATCH_SIZE = 16
#: A1111 fields aptp cannot honour, with the value that means "off": any other value is a 422
#: rather than silently ignored (shared by txt2img and img2img).
UNSUPPORTED_FIELDS = {"enable_hr": False, "restore_faces": False, "tiling": False, "subseed_strength": 0,
                "styles": [], "script_name": None, "script_args": [], "alwayson_scripts": {},
                "override_settings": {}, "refiner_checkpoint": None, "init_images": None}
_SCHEDULERS_OK = (None, "", "automatic", "Automatic")


def unprocessable(message: str) -> HttpError:
    """A 422 with one line: a field of the right name but the wrong type or range."""
    return HttpError(422, message)


@dataclass(frozen=True)
class Txt2ImgRequest:
    """A checked txt2img request (defaults filled in from the export)."""

    prompt: str
    negative_prompt: str
    seed: int
    seed_requested: int
    steps: int
    cfg_scale: float
    sampler_name: str
    width: int
    height: int
    batch_size: int
    n_iter: int
    send_images: bool

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter

    def seeds(self) -> list[int]:
        """Image ``i`` gets ``seed + i``, as in A1111."""
        return [self.seed + i for i in range(self.images)]


def _integer(data: Mapping[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise unprocessable(f"'{key}' must be an integer, got {shown(value)}")
    if not low <= value <= high:
        raise unprocessable(f"'{key}' must be in [{low}, {high}], got {shown(value)}")
    return value


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise unprocessable(f"'{key}' must be a string, got a JSON {type(value).__name__}")
    try:
        check_text(value, f"'{key}'", allow_blank=True)
    except RuntimeInputError as err:
        raise unprocessable(str(err)) from None
    return value


def sampler_names(pipe: AptpPipeline) -> dict[str, str]:
    """A1111 name -> aptp name of every sampler this export runs (A1111's names first)."""
    available = set(pipe.samplers.names)
    out = {name: aptp for name, aptp in A1111_SAMPLERS.items() if aptp in available}
    out.update({name: name for name in sorted(available) if name not in out.values()})
    return out


def _sampler(data: Mapping[str, Any], pipe: AptpPipeline) -> tuple[str, str]:
    """(A1111 name, aptp name) of the request's sampler (``sampler_name`` wins over ``sampler_index``)."""
    names = sampler_names(pipe)
    default = pipe.scheduler.name
    value = data.get("sampler_name") or data.get("sampler_index")
    if value is None:
        return next((a for a, b in names.items() if b == default), default), default
    if not isinstance(value, str):
        raise unprocessable(f"'sampler_name' must be a string, got {shown(value)}")
    if value in names:
        return value, names[value]
    key = canonical_sampler(value)
    for a1111, aptp in names.items():
        if key in (aptp, canonical_sampler(a1111), *_ALIASES.get(aptp, [])):
            return a1111, aptp
    raise unprocessable(f"sampler {shown(value)} is not one aptp runs for this export; use one of {list(names)} "
                         "(ancestral and Karras variants are not available)")


def parse_txt2img(body: bytes, pipe: AptpPipeline) -> tuple[Txt2ImgRequest, GenerationOptions]:
    """The checked request and its generation options.

    Raises:
        HttpError: 413 for a body over the limit; 422 for anything else wrong (not a JSON
            object, a wrong type, a value out of range, a feature aptp cannot honour).
    """
    data = load_json(body, status=422)
    if not isinstance(data, dict):
        raise unprocessable(f"request body must be a JSON object, got a JSON {type(data).__name__}")
    return parse_fields(data, pipe, UNSUPPORTED_FIELDS)


def parse_fields(data: dict[str, Any], pipe: AptpPipeline, unsupported: Mapping[str, Any],
                 **image_options: Any) -> tuple[Txt2ImgRequest, GenerationOptions]:
    """txt2img's fields of a request object; `image_options` (strength, inpaint, height, width
    of an img2img request) go to the options check. Raises `HttpError` 422."""
    for key, off in unsupported.items():
        value = data.get(key, off)
        if value not in (off, None) and value != off:
            raise unprocessable(f"'{key}' is not supported by aptp-serve (leave it out or set it to {json.dumps(off)})")
    if data.get("scheduler") not in _SCHEDULERS_OK:
        raise unprocessable(f"'scheduler' {shown(data.get('scheduler'))} is not supported: aptp's samplers use the "
                             "export's own noise schedule ('Automatic')")
    prompt = _text(data, "prompt")
    if not prompt.strip():
        raise unprocessable("'prompt' is empty: every image needs some text to condition on (and to route)")
    negative = _text(data, "negative_prompt")
    batch_size = _integer(data, "batch_size", 1, 1, MAX_BATCH_SIZE)
    n_iter = _integer(data, "n_iter", 1, 1, MAX_IMAGES)
    if batch_size * n_iter > MAX_IMAGES:
        raise unprocessable(f"batch_size x n_iter is {batch_size * n_iter}; at most {MAX_IMAGES} images per request")
    seed = data.get("seed", -1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed < MAX_SEED - batch_size * n_iter:
        raise unprocessable(f"'seed' must be -1 (random) or an integer in [0, 2**63 - images), got {shown(seed)}")
    drawn = secrets.randbelow(2**32) if seed == -1 else seed  # A1111 draws 32-bit seeds
    cfg = data.get("cfg_scale")
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, numbers.Real)):
        raise unprocessable(f"'cfg_scale' must be a number, got {shown(cfg)}")
    steps = _integer(data, "steps", None, 1, 10_000)
    width = _integer(data, "width", image_options.pop("width", None), 1, 1 << 20)
    height = _integer(data, "height", image_options.pop("height", None), 1, 1 << 20)
    send = data.get("send_images", True)
    if not isinstance(send, bool):
        raise unprocessable(f"'send_images' must be true or false, got {shown(send)}")
    a1111_sampler, sampler = _sampler(data, pipe)
    try:
        opts = pipe.options(guidance_scale=cfg, num_inference_steps=steps, height=height, width=width,
                            scheduler=sampler, **image_options)
    except RuntimeInputError as err:
        raise unprocessable(str(err)) from None
    request = Txt2ImgRequest(prompt=prompt, negative_prompt=negative, seed=drawn, seed_requested=seed,
                             steps=opts.num_inference_steps, cfg_scale=opts.guidance_scale, sampler_name=a1111_sampler,
                             width=opts.width, height=opts.height, batch_size=batch_size, n_iter=n_iter,
                             send_images=send)
    return request, opts


def model_name(pipe: AptpPipeline) -> str:
    return pipe.artifacts.root.name or "aptp"


def model_title(pipe: AptpPipeline) -> str:
    """A1111's checkpoint title: ``name [hash]`` (the hash: the manifest's sha256, 10 digits)."""
    return f"{model_name(pipe)} [{pipe.manifest_sha256[:10]}]"


def unet_bytes(pipe: AptpPipeline, key: int | str) -> int | None:
    try:
        return int(pipe._unet_file_bytes(key))  # noqa: SLF001 - the file size the residency manager counts
    except OSError:
        return None


def expert_details(pipe: AptpPipeline) -> list[dict[str, Any]]:
    """Each UNet of the export: key, MACs ratio, prompt share, bytes on disk."""
    out = []
    for key in pipe.artifacts.model_keys:
        entry = pipe.artifacts.unet(key)
        out.append({"expert": key, "macs_ratio": 1.0 if key == DENSE else entry.macs_ratio, "share": entry.share,
                    "bytes": unet_bytes(pipe, key)})
    return out


def samplers(pipe: AptpPipeline) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``."""
    listed: dict[str, list[str]] = {}  # aptp name -> its A1111 names, the first one listed
    for a1111, aptp in sampler_names(pipe).items():
        listed.setdefault(aptp, []).append(a1111)
    return [{"name": names[0], "aliases": [*names[1:], aptp, *_ALIASES.get(aptp, [])], "options": {}}
            for aptp, names in listed.items()]


def defaults(pipe: AptpPipeline) -> dict[str, Any]:
    a = pipe.artifacts
    names = sampler_names(pipe)
    return {"steps": pipe.scheduler.num_steps, "cfg_scale": a.guidance_scale, "width": a.image_width,
            "height": a.image_height, "sampler_name": next((k for k, v in names.items() if v == pipe.scheduler.name),
                                                          pipe.scheduler.name),
            "min_size": a.min_size or min(a.image_height, a.image_width),
            "max_size": a.max_size or max(a.image_height, a.image_width), "size_multiple": a.size_multiple,
            "min_steps": pipe.samplers.min_steps, "max_steps": pipe.samplers.max_steps}


def sd_models(pipe: AptpPipeline) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/sd-models``: the one export served, its experts in ``aptp``."""
    a = pipe.artifacts
    return [{"title": model_title(pipe), "model_name": model_name(pipe), "hash": pipe.manifest_sha256[:10],
             "sha256": pipe.manifest_sha256, "filename": str(a.root / "manifest.json"), "config": None,
             "aptp": {"base_model": a.base_model, "num_codes": a.num_codes, "precision": a.precision,
                      "experts": expert_details(pipe), "defaults": defaults(pipe)}}]


#: Options POST accepts: the value must be what aptp already does.
def options(pipe: AptpPipeline) -> dict[str, Any]:
    """``GET /sdapi/v1/options``: the settings aptp has (read-only but for the accepted no-ops)."""
    return {"sd_model_checkpoint": model_title(pipe), "sd_checkpoint_hash": pipe.manifest_sha256,
            "samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
            "aptp_version": __version__}


def set_options(body: bytes, pipe: AptpPipeline) -> None:
    """``POST /sdapi/v1/options``: accepted when every key names an option aptp has and its value
    is the one aptp runs with (a client re-sending the checkpoint it read, say).

    Raises:
        HttpError: 422 for any other key or value.
    """
    data = load_json(body, status=422)
    if not isinstance(data, dict):
        raise unprocessable(f"request body must be a JSON object, got a JSON {type(data).__name__}")
    current = options(pipe)
    accepted = {"sd_model_checkpoint": {current["sd_model_checkpoint"], model_name(pipe), pipe.manifest_sha256[:10]},
                "samples_format": {"png"}, "CLIP_stop_at_last_layers": {1}, "eta_noise_seed_delta": {0}}
    for key, value in data.items():
        if key not in accepted:
            raise unprocessable(f"option {shown(key)} cannot be set on aptp-serve; settable (to their current "
                                 f"values only): {sorted(accepted)}")
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value not in accepted[key]:
            raise unprocessable(f"option {key!r} cannot be {shown(value)} on aptp-serve: it serves "
                                 f"{current[key]!r} only")


def _infotext(req: Txt2ImgRequest, pipe: AptpPipeline, seed: int, aptp: Mapping[str, Any]) -> str:
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    macs = aptp.get("macs_ratio")
    lines.append(f"Steps: {req.steps}, Sampler: {req.sampler_name}, CFG scale: {req.cfg_scale:g}, Seed: {seed}, "
                 f"Size: {req.width}x{req.height}, Model hash: {pipe.manifest_sha256[:10]}, Model: {model_name(pipe)}, "
                 f"aptp expert: {aptp['expert']}, aptp MACs: {'?' if macs is None else f'{macs:.3f}'}, "
                 f"Version: aptp {__version__}")
    return "\n".join(lines)


def image_info(pipe: AptpPipeline, result: Mapping[str, Any]) -> dict[str, Any]:
    """aptp's fields of one generated image (``result``: the server's result dict)."""
    key = result["expert"]
    entry = pipe.artifacts.unet(key)
    return {"seed": result["seed"], "expert": key, "macs_ratio": 1.0 if key == DENSE else entry.macs_ratio,
            "share": entry.share, "expert_bytes": unet_bytes(pipe, key), "provider": result.get("provider"),
            "batch_size": result.get("batch_size"), "truncated": bool(result.get("truncated")),
            "timings": dict(result.get("timings") or {})}


def txt2img_response(req: Txt2ImgRequest, pipe: AptpPipeline, results: Sequence[Mapping[str, Any]],
                     interrupted: int = 0, latency_s: float | None = None) -> dict[str, Any]:
    """The txt2img response for the images that finished (``results`` in seed order)."""
    per_image = [image_info(pipe, r) for r in results]
    seeds = [r["seed"] for r in results]
    info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * len(results), "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * len(results), "seed": seeds[0] if seeds else req.seed,
        "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(results), "subseed_strength": 0,
        "width": req.width, "height": req.height, "sampler_name": req.sampler_name, "cfg_scale": req.cfg_scale,
        "steps": req.steps, "batch_size": req.batch_size, "n_iter": req.n_iter, "restore_faces": False,
        "sd_model_name": model_name(pipe), "sd_model_hash": pipe.manifest_sha256[:10], "clip_skip": 1,
        "index_of_first_image": 0, "job_timestamp": "", "version": f"aptp {__version__}",
        "infotexts": [_infotext(req, pipe, s, a) for s, a in zip(seeds, per_image)],
        "aptp": {"images": per_image, "interrupted": interrupted, "latency_s": latency_s},
    }
    parameters = {key: value for key, value in asdict(req).items() if key not in ("seed_requested",)}
    parameters["seed"] = req.seed_requested
    images = [base64.b64encode(r["png"]).decode("ascii") for r in results] if req.send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def result_dict(result: GenerationResult, png: bytes) -> dict[str, Any]:
    """The server-side result of one image (what both modes hand to the contract modules)."""
    return {"prompt": result.prompt, "seed": result.seed, "expert": result.expert, "truncated": bool(result.truncated),
            "batch_size": result.batch_size, "timings": dict(result.timings), "provider": result.provider, "png": png}
