"""The featurizer interface: images in, descriptors at keypoints out.

Coordinate convention everywhere: keypoints are float (x, y) in ORIGINAL image pixels,
pixel centres at integer coordinates (hloc's convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..describe import sample_descriptors


class KeypointsLike(Protocol):
    """What describers read of keypoints (see ``dift_sfm.keypoints.Keypoints``)."""

    xy: np.ndarray
    sizes: np.ndarray | None
    angles: np.ndarray | None


@dataclass
class DenseFeatures:
    """A dense feature map for one image.

    Attributes:
        features: (C, h, w) float tensor. The map covers the whole image: the network input was
            the full image resized (no crop, no padding), so feature cell (i, j) has its centre
            at original pixel ((j + 0.5) * W / w - 0.5, (i + 0.5) * H / h - 0.5).
        image_size: (W, H) of the original image.
        input_size: (W_in, H_in) of the resized image that the network saw.
    """

    features: torch.Tensor
    image_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def stride(self) -> tuple[float, float]:
        """Input pixels per feature cell along (x, y)."""
        return (self.input_size[0] / self.features.shape[-1],
                self.input_size[1] / self.features.shape[-2])

    def sample(self, keypoints: np.ndarray) -> np.ndarray:
        """Bilinear descriptors at keypoints (N, 2) -> (N, C) float32, L2-normalised."""
        return sample_descriptors(self.features, keypoints, self.image_size)


class Featurizer:
    """Describes keypoints of one image.

    Subclasses set ``descriptor_dim`` and implement ``describe``. ``conf`` is the featurizer
    section of a named conf (see ``dift_sfm.confs``).
    """

    descriptor_dim: int = 0
    default_conf: dict = {}

    def __init__(self, conf: dict | None = None):
        self.conf = {**self.default_conf, **(conf or {})}

    def describe(self, image: np.ndarray, keypoints: np.ndarray, **kwargs) -> np.ndarray:
        """Descriptors of ``image`` (H, W, 3) float32 RGB in [0, 1] at ``keypoints`` (N, 2).

        ``kwargs`` may carry ``sizes`` and ``angles`` (N,) for classical descriptors.
        Returns (N, D) float32, L2-normalised rows.
        """
        raise NotImplementedError

    def describe_batch(self, images: Sequence[np.ndarray],
                       keypoints: Sequence[KeypointsLike]) -> list[np.ndarray]:
        """``describe`` for several images at once (featurizers may batch the network calls).

        ``keypoints[i]`` has ``xy`` (N_i, 2) and optional ``sizes``/``angles``.
        """
        return [self.describe(im, k.xy, sizes=k.sizes, angles=k.angles)
                for im, k in zip(images, keypoints, strict=True)]


class DenseFeaturizer(Featurizer):
    """A featurizer that computes a dense map, then samples it at keypoints."""

    def dense(self, image: np.ndarray) -> DenseFeatures:
        """Dense features of ``image`` (H, W, 3) float32 RGB in [0, 1]."""
        raise NotImplementedError

    def dense_batch(self, images: Sequence[np.ndarray]) -> list[DenseFeatures]:
        """``dense`` of several images; override to share network calls between them."""
        return [self.dense(image) for image in images]

    def describe(self, image: np.ndarray, keypoints: np.ndarray, **kwargs) -> np.ndarray:
        return self.dense(image).sample(keypoints)

    def describe_batch(self, images: Sequence[np.ndarray],
                       keypoints: Sequence[KeypointsLike]) -> list[np.ndarray]:
        return [d.sample(k.xy) for d, k in zip(self.dense_batch(images), keypoints, strict=True)]


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' -> CUDA if available, else MPS, else CPU; anything else is passed to torch."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA (fp32 where it matters is the model's job), float32 elsewhere.

    On CPUs without native bf16 (AVX2 only) bf16 is far slower than fp32, hence fp32 there.
    """
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"Unknown dtype '{name}', expected one of {sorted(table)} or 'auto'.")
    return table[name]
