"""The featurizer interface: images in, descriptors at keypoints out.

Coordinate convention everywhere: keypoints are float (x, y) in ORIGINAL image pixels,
pixel centres at integer coordinates (hloc's convention).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..descriptor_sampling import sample_descriptors
from ..errors import DiftSfmError
from ..planning import featurizer_batch_size


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
    section of a named conf (see ``dift_sfm.confs``): it overrides ``default_conf``, the one
    place of a featurizer's defaults, which lists every key it accepts.
    ``batch_size`` is the number of images the extraction loop passes per ``describe_batch``.
    """

    descriptor_dim: int = 0
    default_conf: dict[str, Any] = {"name": None, "batch_size": 1}

    def __init__(self, conf: dict | None = None):
        conf = dict(conf or {})
        unknown = sorted(set(conf) - set(self.default_conf))
        if unknown:
            raise DiftSfmError(
                f"Unknown featurizer key(s) {', '.join(unknown)} for featurizer "
                f"'{self.default_conf.get('name')}'. Valid keys: "
                f"{', '.join(sorted(self.default_conf))}.")
        self.conf = {**copy.deepcopy(self.default_conf), **conf}
        self.batch_size = featurizer_batch_size(self.conf)

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


def input_size(img_size: Any, image_wh: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Network input (W_in, H_in) for an image of ``image_wh`` (W, H), from ``img_size``.

    ``img_size`` (every dense featurizer reads it the same way):
    - ``[W, H]``: exactly this (each a positive multiple of ``multiple``, else DiftSfmError);
    - ``[W, null]`` / ``[null, H]``: the other side from the image's aspect ratio;
    - an int S: the longer side is S, the shorter follows the aspect ratio;
    - ``null``: the image's own size.
    Derived sides are rounded to the nearest multiple of ``multiple`` (at least ``multiple``).
    """
    w, h = image_wh

    def derived(side: float) -> int:
        return max(multiple, int(round(side / multiple)) * multiple)

    if img_size is None:
        size = derived(w), derived(h)
    elif isinstance(img_size, (int, float)) and not isinstance(img_size, bool):
        scale = float(img_size) / max(w, h)
        size = derived(w * scale), derived(h * scale)
    elif isinstance(img_size, Sequence) and not isinstance(img_size, str) and len(img_size) == 2:
        tw, th = img_size
        if tw is None and th is None:
            raise DiftSfmError("featurizer.img_size [null, null]: give at least one side.")
        if tw is None:
            size = derived(w * th / h), int(th)
        elif th is None:
            size = int(tw), derived(h * tw / w)
        else:
            size = int(tw), int(th)
    else:
        raise DiftSfmError(f"featurizer.img_size must be [W, H], [W, null], [null, H], an int "
                           f"or null, got {img_size}.")
    if min(size) <= 0 or size[0] % multiple or size[1] % multiple:
        raise DiftSfmError(f"featurizer.img_size gives an input of {size[0]}x{size[1]}; both "
                           f"sides must be positive multiples of {multiple} for this model.")
    return size


def image_to_tensor(image: np.ndarray, size: tuple[int, int],
                    device: torch.device | str) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1] -> (1, 3, H_in, W_in) float32 in [-1, 1] on ``device``.

    ``size`` is (W_in, H_in); the whole image is resized (bicubic, antialiased, clamped to
    [0, 1]), never cropped or padded. The resize runs on ``device``.
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    x = x.to(device)
    if (x.shape[-1], x.shape[-2]) != tuple(size):
        x = F.interpolate(x, size=(size[1], size[0]), mode="bicubic", align_corners=False,
                          antialias=True).clamp_(0, 1)
    return x * 2 - 1


def seeded_normal(seed: int, shapes: Sequence[tuple[int, ...] | None]
                  ) -> list[torch.Tensor | None]:
    """Standard normal float32 tensors on the CPU, drawn in order from one generator seeded
    with ``seed``; a None shape gives None and draws nothing. The same seed gives the same
    tensors on any device, in any batch or order of images."""
    gen = torch.Generator().manual_seed(int(seed))
    return [None if s is None else torch.randn(s, generator=gen) for s in shapes]
