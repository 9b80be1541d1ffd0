"""DIFT-SD: dense features from one denoising step of Stable Diffusion (Tang et al. 2023).

The algorithm (``sd_dift_features``), with its randomness explicit:

1. ``posterior = vae.encode(image).latent_dist`` -- the image is encoded ONCE;
2. per ensemble member e: ``latent_e = (posterior.mean + posterior.std * vae_eps[e]) * scaling``;
3. ``x_t = scheduler.add_noise(latent, noise, t)``, t the raw training index in 0..999;
4. the UNet runs on ``x_t`` (timestep t, the prompt embedding) and STOPS after
   ``unet.up_blocks[up_ft_index]`` (its output, after its upsampler): the rest is never run;
5. features = the mean over members, (1, C, h, w), not normalised.

The public DIFT code encodes each of the E copies of the image with the VAE; sampling the
posterior E times from one encoding is the same distribution at 1/E of the VAE cost.
``SDFeaturizer`` draws ``vae_eps`` and ``noise`` from a ``torch.Generator`` seeded with
``seed`` for every image (on the CPU, so features do not depend on the device or on the order of
the images), batches the members (``chunk_size`` UNet samples per call, halved automatically on
GPU out-of-memory), and runs in bf16 on CUDA (posterior sampling, noising and the ensemble mean in
float32), channels_last, with diffusers' SDPA attention.

Input sizes (``img_size``): ``[W, H]`` (both multiples of 64 for SD); ``[W, null]`` or
``[null, H]``: the other side from the image's aspect ratio; a single int S: the longer side is S
and the shorter follows the aspect ratio. Derived sides are rounded to a multiple of 64 (of
``8 * 2**(len(unet.down_blocks) - 1)`` in general). The whole image is resized (bicubic,
antialiased), never cropped or padded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .. import logger
from ..errors import DiftSfmError
from ..models.sd import SD_MODEL
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


class _EarlyExit(Exception):
    """Raised by a forward hook to leave the UNet right after the requested up-block."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output


def unet_up_block_output(unet, sample: torch.Tensor, timestep: torch.Tensor | int,
                         encoder_hidden_states: torch.Tensor, up_ft_index: int,
                         early_exit: bool = True) -> torch.Tensor:
    """Output of ``unet.up_blocks[up_ft_index]`` (after its upsampler) for ``sample`` (N, 4, h, w).

    With ``early_exit`` a forward hook stops the UNet there (later up-blocks and the output
    head never run); without it the full UNet runs and the block output is captured (the
    reference for tests and benchmarks). Returns (N, C_i, h_i, w_i) in the UNet's dtype.
    """
    n_up = len(unet.up_blocks)
    if not 0 <= up_ft_index < n_up:
        raise DiftSfmError(f"up_ft_index must be in 0..{n_up - 1} for this UNet, "
                           f"got {up_ft_index}.")
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        if early_exit:
            raise _EarlyExit(output)
        captured.append(output)

    handle = unet.up_blocks[up_ft_index].register_forward_hook(hook)
    try:
        unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)
    except _EarlyExit as stop:
        return stop.output
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def sd_dift_features(unet, vae, scheduler, image: torch.Tensor, prompt_embeds: torch.Tensor,
                     t: int, up_ft_index: int, vae_eps: torch.Tensor | None,
                     noise: torch.Tensor | None, scaling_factor: float = 0.18215,
                     chunk_size: int | None = None, early_exit: bool = True) -> torch.Tensor:
    """DIFT features of a batch of images, the randomness given explicitly.

    Args:
        image: (B, 3, H, W) in [-1, 1]; H, W multiples of the model's size factor.
        prompt_embeds: (1, L, C) (or (B, L, C)) text conditioning.
        t: diffusion timestep, the raw training index 0..999.
        up_ft_index: which ``unet.up_blocks`` output to return.
        vae_eps: (E, 4, h, w) or (B, E, 4, h, w) standard normal draws for the posterior
            samples, h = H / 8; None: use the posterior mean (no VAE sampling).
        noise: same shape as ``vae_eps``: the diffusion noise; None: no noising (the clean
            latent goes into the UNet, as for CleanDIFT).
        scaling_factor: the VAE latent scale.
        chunk_size: at most this many members (over all images) per UNet call; None: all.
        early_exit: stop the UNet after the block (False: run it all, same result).

    Returns:
        (B, C, h', w') float32, the mean over the E members; not normalised.
    """
    device = image.device
    b = image.shape[0]
    posterior = vae.encode(image.to(vae.dtype)).latent_dist
    mean, std = posterior.mean.float(), posterior.std.float()  # (B, 4, h, w)
    draws = vae_eps if vae_eps is not None else noise
    members = 1 if draws is None else draws.shape[-4]

    def per_image(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        x = x.to(device=device, dtype=torch.float32)
        return x.expand(b, *x.shape) if x.dim() == 4 else x  # (B, E, 4, h, w)

    vae_eps, noise = per_image(vae_eps), per_image(noise)
    latents = mean[:, None] if vae_eps is None else mean[:, None] + std[:, None] * vae_eps
    latents = (latents * scaling_factor).expand(b, members, *mean.shape[1:]).flatten(0, 1)
    timesteps = torch.full((latents.shape[0],), int(t), dtype=torch.long, device=device)
    if noise is not None:
        latents = scheduler.add_noise(latents, noise.flatten(0, 1), timesteps)

    cond = prompt_embeds.to(device=device, dtype=unet.dtype)
    cond = cond.expand(b, *cond.shape[1:]) if cond.shape[0] == 1 else cond
    cond = cond.repeat_interleave(members, dim=0)  # (B * E, L, C)
    channels_last = unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    step = chunk_size or latents.shape[0]
    outputs = []
    for start in range(0, latents.shape[0], step):
        x = latents[start:start + step].to(unet.dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = unet_up_block_output(unet, x, timesteps[start:start + step],
                                   cond[start:start + step], up_ft_index, early_exit)
        outputs.append(out.float())
    feats = torch.cat(outputs)
    return feats.unflatten(0, (b, members)).mean(1)


def size_multiple(unet, vae) -> int:
    """Input sides must be multiples of this: VAE factor x UNet downsampling factor."""
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)


#: dynamo's note on diffusers' lru_cache-wrapped ``is_torch_version`` in upsampling.py (harmless)
_LRU_CACHE_WARNING = (r"Dynamo detected a call to a `functools\.lru_cache`-wrapped function at "
                      r"'upsampling\.py:\d+'")


def compile_sd(unet, vae, up_ft_index: int, compiler: Compiler) -> None:
    """torch.compile what runs: the VAE encoder and the UNet blocks up to ``up_blocks[i]``.

    Blocks are compiled one by one, not the UNet: its early exit is an exception raised by a
    hook on ``up_blocks[i]``, so that block's own call stays eager and its children compile.
    With ``compiler.dynamic_batch`` one graph per block serves every batch size > 1 (the UNet
    sees ensemble x batch samples), so batch 1 and batch 4 share graphs and the cache.
    """
    warnings.filterwarnings("ignore", message=_LRU_CACHE_WARNING, category=UserWarning)
    compiler.module(vae.encoder)
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks[:up_ft_index]]:
        compiler.module(block)
    for child in unet.up_blocks[up_ft_index].children():
        for module in (child if isinstance(child, torch.nn.ModuleList) else [child]):
            compiler.module(module)


class SDFeaturizer(DenseFeaturizer):
    """DIFT-SD dense featurizer (name ``sd``, confs ``dift-sd``...); keys in ``default_conf``."""

    default_conf = {
        "name": "sd",
        "batch_size": 1,             # images per describe_batch call of the extraction loop
        "model": SD_MODEL,           # hub id, diffusers folder, or .safetensors/.ckpt file
        "revision": None,            # hub revision (of `config` for a single file)
        "config": None,              # single file only: hub id/folder with the configs
        "unet_weights": None,        # path | 'owner/repo/file' | {repo, filename, revision}
        "prompt": "",
        "prompt_embeds": None,       # safetensors file with a (1, 77, C) embedding
        "img_size": [768, 768],      # [W, H] | [W, null] | [null, H] | int (longer side) | null
        "t": 0,
        "up_ft_index": 2,
        "ensemble": 8,
        "sample_posterior": True,    # False: posterior mean
        "add_noise": True,           # False: the clean latent enters the UNet
        "dtype": "auto",             # auto: bf16 on CUDA, fp32 elsewhere
        "device": "auto",
        "seed": 0,
        "chunk_size": None,          # UNet samples per call; None: ensemble x batch (OOM halves)
        "channels_last": "auto",     # auto: on CUDA
        "compile": "auto",           # torch.compile; auto: on CUDA (eager fallback on failure)
        "compile_mode": None,        # torch.compile mode, e.g. "max-autotune"
        "compile_dynamic_batch": False,  # true: one compiled graph for any batch size
    }

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        from ..models.sd import load_sd_model

        c = self.conf
        self.device = resolve_device(c["device"])
        self.dtype = resolve_dtype(c["dtype"], self.device)
        # SD's VAE overflows in fp16 (its config says force_upcast); bf16 has the range.
        vae_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        model = load_sd_model(c["model"], revision=c["revision"], unet_weights=c["unet_weights"],
                              config=c["config"], prompt=c["prompt"],
                              prompt_embeds=c["prompt_embeds"], dtype=self.dtype,
                              vae_dtype=vae_dtype, device=self.device)
        self.model = model
        self.unet = model.unet.to(self.device)
        self.vae = model.vae.to(self.device)
        self.scheduler = model.scheduler
        self.prompt_embeds = model.prompt_embeds.to(self.device)
        self.channels_last = resolve_flag(c["channels_last"], self.device)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        n_up = len(self.unet.up_blocks)
        if not 0 <= int(c["up_ft_index"]) < n_up:
            raise DiftSfmError(f"featurizer.up_ft_index must be in 0..{n_up - 1}, "
                               f"got {c['up_ft_index']}.")
        steps = self.scheduler.config.num_train_timesteps
        if not 0 <= int(c["t"]) < steps:
            raise DiftSfmError(f"featurizer.t must be in 0..{steps - 1}, got {c['t']}.")
        channels = list(reversed(self.unet.config.block_out_channels))
        self.descriptor_dim = channels[int(c["up_ft_index"])]
        self.multiple = size_multiple(self.unet, self.vae)
        self.random = bool(c["sample_posterior"]) or bool(c["add_noise"])
        self.ensemble = max(1, int(c["ensemble"])) if self.random else 1
        if not self.random and int(c["ensemble"]) > 1:
            logger.info("No posterior sampling and no noise: every ensemble member is the same, "
                        "computing one.")
        self.chunk_size = max(1, int(c["chunk_size"] or self.ensemble * self.batch_size))
        cuda_speedups(self.device)
        self.compiler = Compiler("the SD UNet/VAE blocks", c["compile_mode"],
                                 dynamic_batch=bool(c["compile_dynamic_batch"]))
        if resolve_flag(c["compile"], self.device):
            setup_compile_cache()
            compile_sd(self.unet, self.vae, int(c["up_ft_index"]), self.compiler)
        logger.info("DIFT-SD: %s on %s (%s%s%s), t=%d, up_blocks[%d] (%d channels), "
                    "ensemble %d.", model.name, self.device, str(self.dtype).replace("torch.", ""),
                    ", channels_last" if self.channels_last else "",
                    ", compiled" if self.compiler.active else "", c["t"], c["up_ft_index"],
                    self.descriptor_dim, self.ensemble)

    def input_size(self, image_wh: tuple[int, int]) -> tuple[int, int]:
        """(W_in, H_in) the network sees for an image of (W, H); see ``base.input_size``."""
        return input_size(self.conf["img_size"], image_wh, self.multiple)

    def draw_randomness(self, latent_hw: tuple[int, int]
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(vae_eps, noise), each (E, 4, h, w) float32 on CPU, generator seeded with ``seed``.

        A disabled draw (``sample_posterior`` / ``add_noise`` false) is None.
        """
        shape = (self.ensemble, self.unet.config.in_channels, *latent_hw)
        eps, noise = seeded_normal(self.conf["seed"], [
            shape if self.conf["sample_posterior"] else None,
            shape if self.conf["add_noise"] else None])
        return eps, noise

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        latent_hw = (batch.shape[-2] // vae_factor, batch.shape[-1] // vae_factor)
        eps, noise = self.draw_randomness(latent_hw)

        def run(chunk: int) -> torch.Tensor:
            return self.compiler.run(lambda: sd_dift_features(
                self.unet, self.vae, self.scheduler, batch, self.prompt_embeds,
                int(self.conf["t"]), int(self.conf["up_ft_index"]), eps, noise,
                self.model.scaling_factor, chunk_size=chunk))

        try:
            feats, self.chunk_size = halve_on_oom(run, self.chunk_size, self.device)
        except OutOfMemoryError as err:
            raise DiftSfmError(
                f"Out of GPU memory even with one UNet sample per call ({err}). Use a "
                f"smaller featurizer.img_size, dtype bf16/fp16, or another GPU.") from err
        return feats

    def dense(self, image: np.ndarray) -> DenseFeatures:
        """DIFT features of ``image`` (H, W, 3) float32 RGB in [0, 1]: (C, h, w) float32."""
        return self.dense_batch([image])[0]

    def dense_batch(self, images: Sequence[np.ndarray]) -> list[DenseFeatures]:
        """``dense`` for several images; those with the same input size share UNet calls.

        Every image gets the same seeded randomness, so a result never depends on its batch.
        """
        results: list[DenseFeatures | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            groups.setdefault(self.input_size((w, h)), []).append(i)
        for size, indices in groups.items():
            per_call = max(1, self.chunk_size // self.ensemble)
            for start in range(0, len(indices), per_call):
                part = indices[start:start + per_call]
                batch = torch.cat([image_to_tensor(images[i], size, self.device) for i in part])
                feats = self._features(batch)
                for i, f in zip(part, feats, strict=True):
                    h, w = images[i].shape[:2]
                    results[i] = DenseFeatures(f.cpu(), image_size=(w, h), input_size=size)
        return results  # type: ignore[return-value]


__all__ = ["SDFeaturizer", "compile_sd", "image_to_tensor", "input_size", "sd_dift_features",
           "size_multiple", "unet_up_block_output"]
