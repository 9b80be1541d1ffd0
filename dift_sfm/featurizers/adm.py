"""DIFT-ADM: dense features from OpenAI's ADM diffusion UNet (Tang et al. 2023).

The image is resized to ``img_size``, noised to timestep ``t`` with ``ensemble`` independent
noise draws, and the output of ``output_blocks[output_block]`` is averaged over the draws.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import logger
from ..errors import DiftSfmError, ModelLoadError
from ..models.adm import ADM_256_UNCOND_FLAGS, ADMConfig, ADMUNet, alphas_cumprod
from .base import DenseFeatures, DenseFeaturizer, resolve_device, resolve_dtype

ADM_256_UNCOND_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
)
ADM_256_UNCOND_FILE = "256x256_diffusion_uncond.pt"


def cache_dir() -> Path:
    """``$DIFT_SFM_CACHE`` if set, else ``~/.cache/dift_sfm``."""
    return Path(os.environ.get("DIFT_SFM_CACHE") or Path.home() / ".cache" / "dift_sfm")


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("DIFT_SFM_OFFLINE", "HF_HUB_OFFLINE"))


def default_checkpoint() -> Path:
    """Path of the official 256x256 unconditional checkpoint, downloaded once into the cache.

    Raises ModelLoadError when it is absent and cannot be downloaded (offline or no network).
    """
    path = cache_dir() / ADM_256_UNCOND_FILE
    if path.is_file():
        return path
    how = (f"Download {ADM_256_UNCOND_URL} (about 2.2 GB) and put it at {path} (or set "
           f"$DIFT_SFM_CACHE to its folder), or pass its path as featurizer.model.")
    if _offline():
        raise ModelLoadError(f"ADM checkpoint {path} not found and downloads are disabled "
                             f"(HF_HUB_OFFLINE / DIFT_SFM_OFFLINE is set). {how}")
    logger.info("Downloading the ADM checkpoint %s to %s.", ADM_256_UNCOND_URL, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Writes a temporary file in the same folder and moves it into place when complete.
        torch.hub.download_url_to_file(ADM_256_UNCOND_URL, str(path), progress=True)
    except Exception as exc:  # network, disk, permission errors: all end the same way
        raise ModelLoadError(f"Could not download the ADM checkpoint ({exc}). {how}") from exc
    return path


def read_flags(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Model flags from a dict or a json file; a ``{"flags": {...}}`` wrapper is accepted."""
    if isinstance(source, Mapping):
        flags = dict(source)
    else:
        try:
            flags = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"Could not read ADM flags from {source}: {exc}") from exc
    if isinstance(flags.get("flags"), Mapping):
        flags = dict(flags["flags"])
    return flags


def _find_flags(weights: Path) -> Path | None:
    """A flags json next to the weights: ``NAME.json``, or ``NAME.json`` for ``NAME_weights.*``."""
    stem = weights.name.split(".")[0]
    candidates = [weights.with_name(stem + ".json")]
    if stem.endswith("_weights"):
        candidates.append(weights.with_name(stem[: -len("_weights")] + ".json"))
    return next((c for c in candidates if c.is_file()), None)


def load_adm(model: str | Path | None = None,
             flags: Mapping[str, Any] | str | Path | None = None) -> ADMUNet:
    """Build the ADM UNet and load its weights (float32, CPU, eval mode, no grad).

    Args:
        model: checkpoint path (``.pt``/``.pth``, or ``.safetensors``); None or "default": the
            official ``256x256_diffusion_uncond.pt``, downloaded once into ``cache_dir()``.
        flags: model flags (dict or json path). Default: a json next to the weights
            (``NAME.json``; ``NAME.json`` for ``NAME_weights.safetensors``), else the flags of
            the official 256x256 unconditional model.
    """
    path = default_checkpoint() if model in (None, "default") else Path(model).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"ADM checkpoint {path} does not exist. Set featurizer.model to "
                             f"a .pt or .safetensors file, or to null for the official model.")
    flags_source: Any = flags if flags is not None else _find_flags(path)
    flags_dict = ADM_256_UNCOND_FLAGS if flags_source is None else read_flags(flags_source)
    try:
        config = ADMConfig.from_flags(flags_dict)
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"Invalid ADM flags ({flags_source or 'defaults'}): {exc}") from exc

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:  # mmap: no second copy of the 2.2 GB in memory
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be mmap-ed
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"Could not read ADM checkpoint {path}: {exc}. Is the file "
                             f"complete? Delete it and download it again.") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]

    with torch.device("meta"):
        net = ADMUNet(config)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise ModelLoadError(
            f"ADM checkpoint {path} does not fit the model flags from "
            f"{flags_source or 'the official 256x256 unconditional model'}: "
            f"{' '.join(lines[:4])[:600]} ... Give the right flags as featurizer.flags "
            f"(dict or json path) or as a json next to the weights."
        ) from exc
    return net.float().eval().requires_grad_(False)


def adm_dift_features(
    model: ADMUNet,
    image: torch.Tensor,
    t: int,
    output_block: int,
    noise: torch.Tensor,
    chunk_size: int | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """DIFT-ADM features with explicit noise.

    ``x_t = sqrt(abar_t) * image + sqrt(1 - abar_t) * noise_e`` for each ensemble member e (raw
    integer t, the model's schedule), then the mean over members of the output of
    ``output_blocks[output_block]``. No normalisation.

    Args:
        model: the ADM UNet (any compute dtype; noising is done in float32).
        image: (1, 3, H, W) in [-1, 1], H and W multiples of ``model.config.size_multiple``.
        noise: (E, 3, H, W) standard normal noise, on the model's device.
        chunk_size: members per forward pass (default all). On CUDA out-of-memory the chunk is
            halved and the computation goes on.
        channels_last: feed the model channels-last inputs (for a channels-last model).
    Returns:
        (1, C, H / s, W / s) float32, C = ``model.output_channels[output_block]``,
        s = ``model.output_ds[output_block]``.
    """
    return _dift_features(model, image, t, output_block, noise, chunk_size, channels_last)[0]


def _dift_features(model: ADMUNet, image: torch.Tensor, t: int, output_block: int,
                   noise: torch.Tensor, chunk_size: int | None,
                   channels_last: bool) -> tuple[torch.Tensor, int]:
    """``adm_dift_features`` that also returns the chunk size that fitted in memory."""
    abar = alphas_cumprod(model.config)[t]
    a = torch.tensor(np.sqrt(abar), dtype=torch.float32, device=image.device)
    b = torch.tensor(np.sqrt(1.0 - abar), dtype=torch.float32, device=image.device)
    image = image.float()
    members = noise.shape[0]
    chunk = max(1, min(chunk_size or members, members))
    total = torch.zeros((), device=image.device)
    start = 0
    with torch.inference_mode():
        while start < members:
            part = noise[start : start + chunk].float()
            try:
                x_t = a * image + b * part
                if channels_last:
                    x_t = x_t.contiguous(memory_format=torch.channels_last)
                total = total + model.features(x_t, t, output_block).float().sum(0, keepdim=True)
                start += part.shape[0]
                continue
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
            # Out of the except block, so the failed pass's tensors are released.
            x_t = None
            chunk //= 2
            torch.cuda.empty_cache()
            logger.warning("CUDA out of memory: ADM ensemble chunk reduced to %d.", chunk)
    return total / members, chunk


class ADMFeaturizer(DenseFeaturizer):
    """DIFT-ADM dense featurizer (conf: ``confs["dift-adm"]["featurizer"]``).

    Conf fields:
        model: checkpoint path, or None for the official ``256x256_diffusion_uncond.pt``.
        flags: model flags (dict or json path) for non-standard models; default: json next to
            the weights, else the official model's flags.
        img_size: network input [W, H]; an int = longer side with the aspect ratio kept; None =
            the image's own size. Sides are rounded to multiples of 32 (of the model's total
            downsampling).
        t, output_block, ensemble: timestep, output block index, number of noise draws.
        chunk_size: ensemble members per forward pass (None: all; halved on CUDA OOM).
        dtype, device: 'auto' = bfloat16 on CUDA, float32 elsewhere; CUDA > MPS > CPU.
        seed: noise seed; every image's noise is drawn from a fresh generator with this seed.
        channels_last, compile: optional speed-ups (CUDA).
    """

    default_conf = {
        "model": None,
        "flags": None,
        "img_size": [768, 768],
        "t": 41,
        "output_block": 11,
        "ensemble": 4,
        "chunk_size": None,
        "dtype": "auto",
        "device": "auto",
        "seed": 0,
        "channels_last": False,
        "compile": False,
    }

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        c = self.conf
        self.device = resolve_device(c["device"])
        self.dtype = resolve_dtype(c["dtype"], self.device)
        model = load_adm(c["model"], c["flags"])
        n_out = len(model.output_blocks)
        if not 0 <= int(c["output_block"]) < n_out:
            raise DiftSfmError(f"featurizer.output_block must be in [0, {n_out - 1}] for this "
                               f"ADM model, got {c['output_block']}.")
        if not 0 <= int(c["t"]) < model.config.diffusion_steps:
            raise DiftSfmError(f"featurizer.t must be in [0, {model.config.diffusion_steps - 1}]"
                               f", got {c['t']}.")
        model = model.to(self.device).set_compute_dtype(self.dtype)
        if c["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        if c["compile"]:
            model.features = torch.compile(model.features)  # type: ignore[method-assign]
        self.model = model
        self.descriptor_dim = model.output_channels[int(c["output_block"])]
        self.chunk_size = c["chunk_size"]
        logger.info("DIFT-ADM: %s on %s (%s), t=%d, output block %d (%d channels, stride %d).",
                    c["model"] or ADM_256_UNCOND_FILE, self.device, str(self.dtype).split(".")[-1],
                    c["t"], c["output_block"], self.descriptor_dim,
                    model.output_ds[int(c["output_block"])])

    def input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Network input (W_in, H_in) for an image of size (W, H)."""
        m = self.model.config.size_multiple
        w, h = image_size
        size = self.conf["img_size"]
        if size is None:
            target = (w, h)
        elif isinstance(size, int):
            scale = size / max(w, h)
            target = (w * scale, h * scale)
        else:
            target = (size[0], size[1])
        return tuple(max(m, int(round(s / m)) * m) for s in target)  # type: ignore[return-value]

    def noise(self, size: tuple[int, int]) -> torch.Tensor:
        """Seeded noise (ensemble, 3, H_in, W_in) for input size (W_in, H_in); drawn on CPU."""
        gen = torch.Generator().manual_seed(int(self.conf["seed"]))
        w, h = size
        return torch.randn((int(self.conf["ensemble"]), 3, h, w), generator=gen)

    def dense(self, image: np.ndarray) -> DenseFeatures:
        """Dense features of ``image`` (H, W, 3) float32 RGB in [0, 1] -> (C, H_in/s, W_in/s)."""
        h, w = image.shape[:2]
        size = self.input_size((w, h))
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(self.device)
        x = x.permute(2, 0, 1)[None]
        if (w, h) != size:
            x = F.interpolate(x, size=(size[1], size[0]), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        x = x * 2 - 1
        noise = self.noise(size).to(self.device)
        try:
            feats, self.chunk_size = _dift_features(
                self.model, x, int(self.conf["t"]), int(self.conf["output_block"]), noise,
                self.chunk_size, bool(self.conf["channels_last"]))
        except torch.cuda.OutOfMemoryError as exc:
            raise DiftSfmError(
                f"CUDA out of memory for an ADM input of {size[0]}x{size[1]} even with one "
                f"ensemble member at a time: lower featurizer.img_size.") from exc
        return DenseFeatures(feats[0], image_size=(w, h), input_size=size)
