"""Descriptor sampling: bilinear lookup of dense feature maps (C, h, w) at keypoints."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def keypoints_to_grid(keypoints: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Map keypoints (N, 2) in original pixels (centres at integers) to grid_sample coordinates.

    The feature map spans the whole image, so with ``align_corners=False`` the normalised
    coordinate of original pixel x is ``(x + 0.5) / W * 2 - 1``, whatever the map size, the
    resize that produced the network input, or the stride. Returns (1, 1, N, 2).
    """
    w, h = image_size
    scale = keypoints.new_tensor([2.0 / w, 2.0 / h])
    return ((keypoints + 0.5) * scale - 1.0)[None, None]


def sample_descriptors(
    features: torch.Tensor, keypoints: np.ndarray | torch.Tensor, image_size: tuple[int, int]
) -> np.ndarray:
    """Bilinearly sample ``features`` (C, h, w) at ``keypoints`` (N, 2) -> (N, C) float32.

    Keypoints are (x, y) in original image pixels of an image of ``image_size`` (W, H), pixel
    centres at integer coordinates. Points outside the map take the border value. Rows are
    L2-normalised (a zero descriptor stays zero).
    """
    kpts = torch.as_tensor(np.asarray(keypoints, dtype=np.float32)).to(features.device)
    if kpts.numel() == 0:
        return np.zeros((0, features.shape[0]), np.float32)
    grid = keypoints_to_grid(kpts.reshape(-1, 2), image_size).to(features.dtype)
    desc = F.grid_sample(
        features[None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )[0, :, 0].T  # (N, C)
    desc = F.normalize(desc.float(), dim=1)
    return desc.cpu().numpy()
