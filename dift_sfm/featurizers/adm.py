"""DIFT-ADM: dense features from OpenAI's ADM diffusion UNet (Tang et al. 2023).

The image is resized to ``img_size``, noised to timestep ``t`` with ``ensemble`` independent
noise draws, and the output of ``output_blocks[output_block]`` is averaged over the draws.
The model and its loading live in ``dift_sfm.models.adm``.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import logger
from ..errors import DiftSfmError
from ..models.adm import ADM_256_UNCOND_FILE, ADMUNet, alphas_cumprod, load_adm
from ..runtime import (
    Compiler,
    OutOfMemoryError,
    cuda_speedups,
    halve_on_oom,
    resolve_device,
    resolve_dtype,
    resolve_flag,
    setup_compile_cache,
)
from .base import DenseFeatures, DenseFeaturizer, image_to_tensor, input_size, seeded_normal


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

    def run(n: int) -> tuple[torch.Tensor, int]:
        """Sum of the features of members start..start+n: (1, C, h, w) and the count."""
        part = noise[start:start + n].float()
        x_t = a * image + b * part
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return model.features(x_t, t, output_block).float().sum(0, keepdim=True), part.shape[0]

    with torch.inference_mode():
        while start < members:
            (part_sum, done), chunk = halve_on_oom(run, chunk, image.device)
            total = total + part_sum
            start += done
    return total / members, chunk


class ADMFeaturizer(DenseFeaturizer):
    """DIFT-ADM dense featurizer (name ``adm``, conf ``dift-adm``); keys in ``default_conf``."""

    default_conf = {
        "name": "adm",
        "batch_size": 1,             # images per describe_batch call of the extraction loop
        "model": None,               # checkpoint path; None: official 256x256_diffusion_uncond
        "flags": None,               # dict or json path; None: json next to weights, else official
        "img_size": [768, 768],      # [W, H] | [W, null] | [null, H] | int (longer side) | null
        "t": 41,
        "output_block": 11,          # output_blocks index (11: 512 channels, stride 2)
        "ensemble": 4,
        "chunk_size": None,          # ensemble members per forward pass (None: all; OOM halves)
        "dtype": "auto",             # auto: bf16 on CUDA, fp32 elsewhere
        "device": "auto",
        "seed": 0,
        "channels_last": "auto",     # auto: on CUDA
        "compile": "auto",           # torch.compile; auto: on CUDA (eager fallback on failure)
        "compile_mode": None,        # torch.compile mode, e.g. "max-autotune"
    }

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        c = self.conf
        self.device = resolve_device(c["device"])
        self.dtype = resolve_dtype(c["dtype"], self.device)
        model = load_adm(c["model"], c["flags"], device=self.device)
        n_out = len(model.output_blocks)
        if not 0 <= int(c["output_block"]) < n_out:
            raise DiftSfmError(f"featurizer.output_block must be in [0, {n_out - 1}] for this "
                               f"ADM model, got {c['output_block']}.")
        if not 0 <= int(c["t"]) < model.config.diffusion_steps:
            raise DiftSfmError(f"featurizer.t must be in [0, {model.config.diffusion_steps - 1}]"
                               f", got {c['t']}.")
        model = model.set_compute_dtype(self.dtype)
        self.channels_last = resolve_flag(c["channels_last"], self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        cuda_speedups(self.device)
        self.compiler = Compiler("the ADM UNet", c["compile_mode"])
        if resolve_flag(c["compile"], self.device):
            setup_compile_cache()
            self.compiler.method(model, "features")
        self.model = model
        self.descriptor_dim = model.output_channels[int(c["output_block"])]
        self.chunk_size = c["chunk_size"]
        logger.info("DIFT-ADM: %s on %s (%s%s%s), t=%d, output block %d (%d channels, "
                    "stride %d).", c["model"] or ADM_256_UNCOND_FILE, self.device,
                    str(self.dtype).split(".")[-1], ", channels_last" if self.channels_last else "",
                    ", compiled" if self.compiler.active else "", c["t"], c["output_block"],
                    self.descriptor_dim, model.output_ds[int(c["output_block"])])

    def input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Network input (W_in, H_in) for an image of size (W, H); see ``base.input_size``."""
        return input_size(self.conf["img_size"], image_size, self.model.config.size_multiple)

    def noise(self, size: tuple[int, int]) -> torch.Tensor:
        """Seeded noise (ensemble, 3, H_in, W_in) for input size (W_in, H_in); drawn on CPU."""
        w, h = size
        return seeded_normal(self.conf["seed"], [(int(self.conf["ensemble"]), 3, h, w)])[0]

    def dense(self, image: np.ndarray) -> DenseFeatures:
        """Dense features of ``image`` (H, W, 3) float32 RGB in [0, 1] -> (C, H_in/s, W_in/s)."""
        h, w = image.shape[:2]
        size = self.input_size((w, h))
        x = image_to_tensor(image, size, self.device)
        noise = self.noise(size).to(self.device)

        def run() -> tuple[torch.Tensor, int]:
            return _dift_features(self.model, x, int(self.conf["t"]),
                                  int(self.conf["output_block"]), noise, self.chunk_size,
                                  self.channels_last)

        try:
            feats, self.chunk_size = self.compiler.run(run)
        except OutOfMemoryError as exc:
            raise DiftSfmError(
                f"Out of GPU memory for an ADM input of {size[0]}x{size[1]} even with one "
                f"ensemble member at a time: lower featurizer.img_size.") from exc
        return DenseFeatures(feats[0], image_size=(w, h), input_size=size)


__all__ = ["ADMFeaturizer", "adm_dift_features", "load_adm"]
