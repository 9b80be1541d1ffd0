"""OpenAI's "ADM" diffusion UNet (guided-diffusion family), written for feature extraction.

The module tree and parameter names follow the published checkpoints (``time_embed``,
``input_blocks``, ``middle_block``, ``output_blocks``, ``out``) so that e.g.
``256x256_diffusion_uncond.pt`` loads with ``load_state_dict(strict=True)``. The network is
built from the checkpoint's model flags (see ``ADMConfig.from_flags``).

Inference-only choices (none changes the numbers beyond round-off):
- GroupNorm statistics, the timestep embedding, ``time_embed`` and ``emb_layers`` run in float32;
  convolutions and attention run in the compute dtype (``set_compute_dtype``, e.g. bfloat16).
- Attention uses ``F.scaled_dot_product_attention`` on contiguous (B, heads, tokens, ch) q/k/v.
- ``features(x, t, output_block)`` stops after ``output_blocks[output_block]`` and never keeps the
  skip tensors that those blocks do not read. Dropout is ignored.

Tensors are NCHW; ``x`` is the noised image in [-1, 1] scale, ``t`` integer timesteps.

Loading (``load_adm``): the official ``256x256_diffusion_uncond.pt`` is downloaded once into the
cache folder (``dift_sfm.runtime.cache_dir``); any other checkpoint is a ``.pt`` or
``.safetensors`` file whose flags come from the caller, a json next to it, or the official ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import logger
from ..errors import ModelLoadError
from ..runtime import cache_dir
from .weights import Timer, offline, read_state_dict

ADM_256_UNCOND_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
)
ADM_256_UNCOND_FILE = "256x256_diffusion_uncond.pt"

# Flags of OpenAI's unconditional 256x256 model (``256x256_diffusion_uncond.pt``).
ADM_256_UNCOND_FLAGS: dict[str, Any] = {
    "image_size": 256, "class_cond": False, "learn_sigma": True, "num_channels": 256,
    "num_res_blocks": 2, "channel_mult": "", "num_heads": 4, "num_head_channels": 64,
    "num_heads_upsample": -1, "attention_resolutions": "32,16,8", "dropout": 0.0,
    "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "",
    "use_kl": False, "predict_xstart": False, "rescale_timesteps": False,
    "rescale_learned_sigmas": False, "use_checkpoint": False, "use_scale_shift_norm": True,
    "resblock_updown": True, "use_fp16": False, "use_new_attention_order": False,
}

# channel_mult "" means this default per nominal image_size.
_DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def _parse_ints(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class ADMConfig:
    """Architecture and noise schedule of an ADM UNet.

    ``attention_ds`` holds downsample factors (not resolutions) where attention is used.
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (8, 16, 32)
    channel_mult: tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = 4
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    conv_resample: bool = True
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> ADMConfig:
        """Config from guided-diffusion style model flags (as saved with the checkpoints).

        Semantics: ``attention_resolutions`` are resolutions at the nominal ``image_size``
        (attention at downsample factor ``image_size // r``); ``channel_mult`` "" is the default
        for ``image_size``; ``num_head_channels`` > 0 overrides ``num_heads``;
        ``num_heads_upsample`` -1 means ``num_heads``; ``learn_sigma`` gives 6 output channels.
        """
        f = {**ADM_256_UNCOND_FLAGS, **dict(flags)}
        if f.get("class_cond"):
            raise ValueError("Class-conditional ADM models are not supported (class_cond=True).")
        if f.get("timestep_respacing") or f.get("rescale_timesteps"):
            raise ValueError("timestep_respacing / rescale_timesteps are not supported for "
                             "feature extraction: use the plain 1000-step schedule flags.")
        size = int(f["image_size"])
        mult = f["channel_mult"]
        if mult in ("", None):
            if size not in _DEFAULT_CHANNEL_MULT:
                raise ValueError(f"No default channel_mult for image_size {size}: "
                                 "set channel_mult.")
            channel_mult = _DEFAULT_CHANNEL_MULT[size]
        else:
            channel_mult = tuple(float(m) for m in _parse_ints(mult))
        heads = int(f["num_heads"])
        heads_up = int(f["num_heads_upsample"])
        return cls(
            image_size=size,
            in_channels=int(f.get("in_channels", 3)),
            model_channels=int(f["num_channels"]),
            out_channels=6 if f["learn_sigma"] else 3,
            num_res_blocks=int(f["num_res_blocks"]),
            attention_ds=tuple(sorted(size // r for r in _parse_ints(f["attention_resolutions"]))),
            channel_mult=channel_mult,
            num_heads=heads,
            num_head_channels=int(f["num_head_channels"]),
            num_heads_upsample=heads if heads_up == -1 else heads_up,
            use_scale_shift_norm=bool(f["use_scale_shift_norm"]),
            resblock_updown=bool(f["resblock_updown"]),
            use_new_attention_order=bool(f["use_new_attention_order"]),
            diffusion_steps=int(f["diffusion_steps"]),
            noise_schedule=str(f["noise_schedule"]),
        )

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (total downsampling)."""
        return 2 ** (len(self.channel_mult) - 1)


def alphas_cumprod(config: ADMConfig) -> np.ndarray:
    """Cumulative products of (1 - beta) of the model's noise schedule, float64 (steps,)."""
    steps = config.diffusion_steps
    if config.noise_schedule == "linear":
        scale = 1000 / steps  # schedule defined for 1000 steps, stretched to `steps`
        betas = np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    elif config.noise_schedule == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                          for i in range(steps)], dtype=np.float64)
    else:
        raise ValueError(f"Unknown noise_schedule '{config.noise_schedule}'.")
    return np.cumprod(1.0 - betas)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim) float32, [cos | sin] halves."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 (weights stay float32), result in the input dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor, silu: bool = False, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise x (B, C, ...); then optionally ``* (1 + scale) + shift`` and SiLU (float32)."""
        y = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
        if scale is not None:
            y = torch.addcmul(shift, y, 1 + scale)
        return (F.silu(y) if silu else y).to(x.dtype)


class Resample(nn.Module):
    """Nearest 2x upsampling or 2x2 average-pool downsampling, optionally with a conv.

    Parameter names follow the checkpoints: ``conv`` (up) or ``op`` (strided conv down).
    """

    def __init__(self, channels: int, up: bool, use_conv: bool):
        super().__init__()
        self.up = up
        self.use_conv = use_conv
        if use_conv and up:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        elif use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if self.use_conv else x
        return self.op(x) if self.use_conv else F.avg_pool2d(x, 2, 2)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding; optional up/down resampling."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int,
                 use_scale_shift_norm: bool, up: bool = False, down: bool = False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.resample = Resample(channels, up=up, use_conv=False) if (up or down) else None
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        # Index 2 is dropout in training; identity at inference.
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), emb (B, E) float32 -> (B, C_out, H', W')."""
        h = self.in_layers[0](x, silu=True)
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb)[..., None, None]  # float32
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h, silu=True, scale=scale, shift=shift)
        else:
            h = self.out_layers[0](h + e.to(h.dtype), silu=True)
        h = self.out_layers[3](h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions.

    The 1x1 ``qkv`` conv yields 3C channels ordered per head as [q, k, v] ("legacy" order), or
    as [q (all heads), k, v] with ``new_order``.
    """

    def __init__(self, channels: int, num_heads: int, num_head_channels: int,
                 new_order: bool = False):
        super().__init__()
        if num_head_channels > 0:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels not divisible by {num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.new_order = new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        heads, ch = self.num_heads, c // self.num_heads
        if self.new_order:
            qkv = qkv.view(b, 3, heads, ch, -1).permute(1, 0, 2, 4, 3)
        else:
            qkv = qkv.view(b, heads, 3, ch, -1).permute(2, 0, 1, 4, 3)
        # Contiguous (B, heads, T, ch): a strided last dim would fall back to the math kernel.
        q, k, v = qkv.contiguous().unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(ch), as the original
        a = a.transpose(-1, -2).reshape(b, c, hh * ww)
        return (x + self.proj_out(a)).reshape(b, c, hh, ww)


class EmbedSequential(nn.Sequential):
    """A sequence of layers; residual blocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """The ADM UNet. ``forward`` predicts noise (and variance); ``features`` exits early.

    Attributes:
        input_ds, output_ds: downsample factor of each input/output block's output.
        output_channels: channels of each output block's output.
    """

    def __init__(self, config: ADMConfig):
        super().__init__()
        self.config = cfg = config
        mc, temb = cfg.model_channels, 4 * cfg.model_channels
        ssn = cfg.use_scale_shift_norm

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, cfg.num_head_channels, cfg.use_new_attention_order)

        def resample(ch: int, up: bool) -> nn.Module:
            if cfg.resblock_updown:
                return ResBlock(ch, temb, ch, ssn, up=up, down=not up)
            return Resample(ch, up=up, use_conv=cfg.conv_resample)

        self.time_embed = nn.Sequential(nn.Linear(mc, temb), nn.SiLU(), nn.Linear(temb, temb))

        ch = int(cfg.channel_mult[0] * mc)
        ds = 1
        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
        )
        skip_channels, self.input_ds = [ch], [ds]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, temb, int(mult * mc), ssn)]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attention(ch, cfg.num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
                self.input_ds.append(ds)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(resample(ch, up=False)))
                ds *= 2
                skip_channels.append(ch)
                self.input_ds.append(ds)

        self.middle_block = EmbedSequential(
            ResBlock(ch, temb, ch, ssn), attention(ch, cfg.num_heads), ResBlock(ch, temb, ch, ssn)
        )

        self.output_blocks = nn.ModuleList()
        self.output_ds: list[int] = []
        self.output_channels: list[int] = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), temb, int(mult * mc), ssn)]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attention(ch, cfg.num_heads_upsample))
                if level and i == cfg.num_res_blocks:
                    layers.append(resample(ch, up=True))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
                self.output_ds.append(ds)
                self.output_channels.append(ch)

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the convolutions and attention."""
        return self.input_blocks[0][0].weight.dtype

    def set_compute_dtype(self, dtype: torch.dtype) -> ADMUNet:
        """Run convolutions and attention in ``dtype``; norms and embeddings stay float32."""
        self.float()
        for module in (self.input_blocks, self.middle_block, self.output_blocks, self.out):
            for m in module.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.to(dtype)
        return self

    def _embed(self, t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device).reshape(-1).expand(batch)
        return self.time_embed(timestep_embedding(t, self.config.model_channels))

    def features(self, x: torch.Tensor, t: torch.Tensor | int, output_block: int) -> torch.Tensor:
        """Output of ``output_blocks[output_block]`` for the noised input.

        Args:
            x: (B, 3, H, W), H and W multiples of ``config.size_multiple``.
            t: integer timestep(s), scalar or (B,), used as is (no rescaling).
            output_block: index into ``output_blocks`` (0 = lowest resolution).
        Returns:
            (B, output_channels[output_block], H / output_ds[k], W / output_ds[k]) in the compute
            dtype.
        """
        n_in, n_out = len(self.input_blocks), len(self.output_blocks)
        if not 0 <= output_block < n_out:
            raise ValueError(f"output_block must be in [0, {n_out - 1}], got {output_block}.")
        m = self.config.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"Input size {tuple(x.shape[-2:])} is not a multiple of {m}.")
        emb = self._embed(t, x.shape[0], x.device)
        # Output block j reads the skip of input block n_in - 1 - j: keep only those we reach.
        first_kept = n_in - 1 - output_block
        h = x.to(self.dtype)
        skips: list[torch.Tensor | None] = []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb)
            skips.append(h if i >= first_kept else None)
        h = self.middle_block(h, emb)
        for block in self.output_blocks[: output_block + 1]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Model output (B, out_channels, H, W): predicted noise (+ variance if learn_sigma)."""
        h = self.features(x, t, len(self.output_blocks) - 1)
        return self.out[2](self.out[0](h, silu=True))


# ------------------------------------------------------------------------------ loading
def default_checkpoint() -> Path:
    """Path of the official 256x256 unconditional checkpoint, downloaded once into the cache.

    Raises ModelLoadError when it is absent and cannot be downloaded (offline or no network).
    """
    path = cache_dir() / ADM_256_UNCOND_FILE
    if path.is_file():
        return path
    how = (f"Download {ADM_256_UNCOND_URL} (about 2.2 GB) and put it at {path} (or set "
           f"$DIFT_SFM_CACHE to its folder), or pass its path as featurizer.model.")
    if offline():
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


def find_flags(weights: Path) -> Path | None:
    """A flags json next to the weights: ``NAME.json``, or ``NAME.json`` for ``NAME_weights.*``."""
    stem = weights.name.split(".")[0]
    candidates = [weights.with_name(stem + ".json")]
    if stem.endswith("_weights"):
        candidates.append(weights.with_name(stem[: -len("_weights")] + ".json"))
    return next((c for c in candidates if c.is_file()), None)


def load_adm(model: str | Path | None = None,
             flags: Mapping[str, Any] | str | Path | None = None,
             device: torch.device | str = "cpu") -> ADMUNet:
    """Build the ADM UNet and load its weights (float32, on ``device``, eval mode, no grad).

    The weights are read straight onto ``device`` (safetensors ``device=``, or a memory-mapped
    pickle) into a model built on the meta device: no second copy is ever made on the CPU.

    Args:
        model: checkpoint path (``.pt``/``.pth``, or ``.safetensors``); None or "default": the
            official ``256x256_diffusion_uncond.pt``, downloaded once into ``cache_dir()``.
        flags: model flags (dict or json path). Default: a json next to the weights
            (``NAME.json``; ``NAME.json`` for ``NAME_weights.safetensors``), else the flags of
            the official 256x256 unconditional model.
        device: where the weights go.
    """
    path = default_checkpoint() if model in (None, "default") else Path(model).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"ADM checkpoint {path} does not exist. Set featurizer.model to "
                             f"a .pt or .safetensors file, or to null for the official model.")
    flags_source: Any = flags if flags is not None else find_flags(path)
    flags_dict = ADM_256_UNCOND_FLAGS if flags_source is None else read_flags(flags_source)
    try:
        config = ADMConfig.from_flags(flags_dict)
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"Invalid ADM flags ({flags_source or 'defaults'}): {exc}") from exc

    with Timer() as timer:
        state = read_state_dict(path, device, what="ADM checkpoint")
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
        net = net.float().eval().requires_grad_(False)
    logger.info("Loaded the ADM checkpoint %s onto %s in %.1f s.", path, device, timer.seconds)
    return net
