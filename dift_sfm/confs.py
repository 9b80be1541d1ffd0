"""Named configurations, like hloc's ``confs``: one dict per extractor+matcher setting.

A named conf only says what differs from its components' defaults: each section names its
component (``keypoints.name``, ``featurizer.name``, ``matcher.name``) and the component's own
``default_conf`` (or keyword defaults, for detectors) fills in the rest. ``get_conf(name,
overrides)`` returns the complete conf with dotted overrides applied, e.g.
``{"featurizer.t": 41, "keypoints.max_keypoints": 2048}``. An unknown section or key, or a
value of the wrong type, is a ConfError listing the valid keys.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Callable, Mapping
from typing import Any

from .errors import DiftSfmError
from .formats.resume import CONF_SECTIONS
from .images import PREPROCESSING_DEFAULTS
from .keypoints import detector_defaults
from .pca import default_conf as pca_defaults


class ConfError(DiftSfmError):
    """A conf or an override names an unknown section or key, or has a wrong value type."""


def _featurizer_defaults(name: str | None) -> dict[str, Any]:
    from .featurizers import featurizer_defaults  # torch: imported when a conf is resolved

    return featurizer_defaults(name)


def _matcher_defaults(name: str | None) -> dict[str, Any]:
    from .matchers import matcher_defaults

    return matcher_defaults(name)


_DEFAULTS: dict[str, Callable[[str | None], dict[str, Any]]] = {
    "preprocessing": lambda _: copy.deepcopy(PREPROCESSING_DEFAULTS),
    "keypoints": detector_defaults,
    "featurizer": _featurizer_defaults,
    "matcher": _matcher_defaults,
    "pca": lambda _: copy.deepcopy(pca_defaults),
}
#: section -> function(component name) -> that component's complete default section, for
#: each section of ``formats.resume.CONF_SECTIONS`` (the one list of sections), in its order
SECTIONS = {section: _DEFAULTS[section] for section in CONF_SECTIONS}
TOP_LEVEL = ("name", "output")
#: the component of a section that names none
DEFAULT_COMPONENT = {"keypoints": "dog", "featurizer": "sift", "matcher": "mnn"}

#: DIFT confs: the featurizer sees a 768 px input, so a JPEG is decoded at the largest
#: libjpeg reduction that keeps it, and DoG detects at 1600 px at most (as hloc's SIFT conf);
#: keypoints stay in original pixels. Measured in docs/benchmarks.md (issue 21). Descriptors
#: are stored as float16 (hloc's ``as_half``; keypoints stay float32): a 640-D DIFT-SD entry
#: halves from 10.5 MB, matched in float32 as before (agreement in docs/benchmarks.md).
DIFT_PREPROCESSING = {"detect_max": 1600, "reduced_decode": True, "as_half": True}

confs: dict[str, dict[str, Any]] = {
    # Classical offline baseline: DoG + RootSIFT, matched as hloc's NN-ratio does for SIFT.
    # Descriptors stay float32: 128-D (0.5 KiB per keypoint, 2 MiB per 4096), so float16 would
    # save little, and its ratio test compares two distances whose near-ties fp16 rounding flips.
    "sift": {
        "output": "feats-sift",
        "preprocessing": {"resize_max": 1600},
        "keypoints": {"name": "dog"},
        "featurizer": {"name": "sift"},
        "matcher": {"name": "mnn", "ratio_threshold": 0.8},
    },
    # DIFT-SD, geometric reference settings (Tang et al. 2023): see featurizers/sd.py.
    "dift-sd": {
        "output": "feats-dift-sd",
        "preprocessing": dict(DIFT_PREPROCESSING),
        "keypoints": {"name": "dog"},
        "featurizer": {"name": "sd"},
        "matcher": {"name": "mnn", "metric": "cosine"},
    },
    # DIFT-ADM, geometric reference settings: see featurizers/adm.py.
    "dift-adm": {
        "output": "feats-dift-adm",
        "preprocessing": dict(DIFT_PREPROCESSING),
        "keypoints": {"name": "dog"},
        "featurizer": {"name": "adm"},
        "matcher": {"name": "mnn", "metric": "l2"},
    },
}


def _derive(base: str, output: str, **sections: dict[str, Any]) -> dict[str, Any]:
    conf = copy.deepcopy(confs[base])
    conf["output"] = output
    for key, values in sections.items():
        conf.setdefault(key, {}).update(values)
    return conf


confs["dift-sd-semantic"] = _derive(
    "dift-sd", "feats-dift-sd-semantic", featurizer={"t": 261, "up_ft_index": 1})
# CleanDIFT (Stracke et al. 2025): SD-2.1 with the noise-free fine-tuned UNet; the clean latent
# (posterior mean, no noise) at t=0, one pass. See docs/sd.md.
confs["cleandift-sd"] = _derive(
    "dift-sd", "feats-cleandift-sd",
    featurizer={"unet_weights": {"repo": "CompVis/cleandift",
                                 "filename": "cleandift_sd21_unet.safetensors", "revision": None},
                "ensemble": 1, "sample_posterior": False, "add_noise": False},
)
confs["sift-grid"] = _derive(
    "sift", "feats-sift-grid", keypoints={"name": "grid", "step": 16, "max_keypoints": 4096})


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


def _unknown(kind: str, key: str, valid: list[str]) -> ConfError:
    leaf = key.split(".")[-1]
    valid_others = [v for v in valid if v != leaf]  # never "did you mean" the same name
    close = [v for v in valid_others if leaf and v.startswith(leaf)] or \
        difflib.get_close_matches(leaf, valid_others, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfError(f"Unknown {kind} '{key}'.{hint} Valid: {', '.join(sorted(valid))}.")


#: Options whose default is "auto" and whose other values must be of this type (options
#: not listed here, e.g. ``device``, take any value besides "auto").
AUTO_TYPES: dict[str, type] = {"matcher.pair_batch": int, "matcher.cache_mb": int}


def _check_type(key: str, value: Any, default: Any) -> None:
    """Refuse a value whose type cannot stand for the default's (None is always allowed)."""
    if value is None or default is None or value == "auto" and default == "auto":
        return
    kind = AUTO_TYPES.get(key) if default == "auto" else type(default)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool),
          int: number and float(value).is_integer(),
          float: number,
          str: isinstance(value, str),
          list: isinstance(value, (list, int)),  # sizes: [W, H] or one int (longer side)
          dict: isinstance(value, dict)}.get(kind, True)  # type: ignore[arg-type]
    if not ok:
        wanted = f"{kind.__name__} or \"auto\"" if default == "auto" else kind.__name__
        raise ConfError(f"Conf value {key}={json.dumps(value)} should be of type "
                        f"{wanted} (default: {json.dumps(default)}).")


def _at_least(low: float, none: str | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None:
            return None if none else "null is not allowed"
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low:
            return None
        return f"must be at least {low}" + (f" (or null: {none})" if none else "")
    return check


def _in_range(low: float, high: float, none: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None or isinstance(value, (int, float)) and low < value <= high:
            return None
        return f"must be in ({low}, {high}] (or null: {none})"
    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _mnn_metrics() -> tuple[str, ...]:
    from .matchers.mnn import METRICS  # loaded with the matcher defaults already

    return METRICS


def _device(value: Any) -> str | None:
    if value in (None, "auto"):
        return None
    import torch  # a conf's featurizer defaults already loaded it

    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return "is not a torch device: use auto, cpu, cuda, cuda:N or mps"
    return None


#: Bounds of option values, the one place they are declared: "section.option" -> check (the
#: reason a value is refused, or None), applied by ``resolve_conf`` to every component that
#: has the option. Types are checked against the defaults (``_check_type``); the metric names
#: are the ones ``matchers.mnn`` implements.
BOUNDS: dict[str, Callable[[Any], str | None]] = {
    "preprocessing.resize_max": _at_least(1, none="full resolution"),
    "preprocessing.min_size": _at_least(1),
    "preprocessing.detect_max": _at_least(1, none="no bound"),
    "preprocessing.memory_mb": _at_least(1, none="no budget"),
    "keypoints.max_keypoints": _at_least(1, none="no limit"),
    "keypoints.step": _at_least(1),
    "featurizer.batch_size": _at_least(1),
    "featurizer.ensemble": _at_least(1),
    "featurizer.t": _at_least(0),
    "featurizer.device": _device,
    "matcher.metric": lambda value: _one_of(*_mnn_metrics())(value),
    "matcher.ratio_threshold": _in_range(0, 1, none="no ratio test"),
    "matcher.device": _device,
    "matcher.prefetch": _at_least(1),
    "pca.dim": _at_least(1, none="no PCA"),
}


def _check_bounds(key: str, value: Any) -> None:
    check = BOUNDS.get(key)
    reason = check(value) if check is not None else None
    if reason:
        raise ConfError(f"Conf value {key}={json.dumps(value)} {reason}.")


def _section(section: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Complete one section: its component's defaults, then ``given`` (checked against them)."""
    name = given.get("name", DEFAULT_COMPONENT.get(section))
    defaults = SECTIONS[section](name)
    if name is not None:
        defaults["name"] = name
    for key, value in given.items():
        if key not in defaults:
            raise _unknown(f"{section} option", f"{section}.{key}", list(defaults))
        _check_type(f"{section}.{key}", value, defaults[key])
        _check_bounds(f"{section}.{key}", value)
    return {**defaults, **copy.deepcopy(dict(given))}


def resolve_conf(conf: Mapping[str, Any],
                 overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The complete conf of a (partial) conf dict with dotted ``overrides`` applied.

    Raises ConfError for an unknown section or key (with a did-you-mean) or a wrong value type.
    """
    partial = {k: copy.deepcopy(v) for k, v in conf.items()}
    for key, value in (overrides or {}).items():
        section, _, leaf = key.partition(".")
        if section in TOP_LEVEL and not leaf:
            partial[section] = value
            continue
        if section in SECTIONS and not leaf:
            raise ConfError(f"Conf key '{key}' names a whole section: set one of its options, "
                            f"e.g. --set {section}.name=... (see `dift-sfm confs NAME`).")
        if section not in SECTIONS:
            raise _unknown("conf section", key, [*SECTIONS, *TOP_LEVEL])
        node = partial.setdefault(section, {})
        *path, last = leaf.split(".")
        for part in path:  # nested values, e.g. featurizer.unet_weights.repo
            if not isinstance(node.get(part), dict):
                raise ConfError(f"Conf key '{key}': '{part}' is not a nested option.")
            node = node[part]
        node[last] = value
    unknown = [k for k in partial if k not in SECTIONS and k not in TOP_LEVEL]
    if unknown:
        raise _unknown("conf section", unknown[0], [*SECTIONS, *TOP_LEVEL])
    out = {k: partial[k] for k in TOP_LEVEL if k in partial}
    for section in SECTIONS:
        out[section] = _section(section, partial.get(section) or {})
    return out


def get_conf(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The complete named conf with ``overrides`` applied; clear error for unknown names/keys."""
    if name not in confs:
        raise _unknown("conf", name, list(confs))
    conf = resolve_conf(confs[name], overrides)
    conf["name"] = name
    return conf


def describe_conf(conf: Mapping[str, Any]) -> str:
    """One line that tells named confs apart: detector, descriptor settings, matcher."""
    k, f, m = conf["keypoints"], conf["featurizer"], conf["matcher"]
    desc = f["name"]
    if "t" in f:
        block = f.get("up_ft_index", f.get("output_block"))
        desc += f" t={f['t']} block={block} ensemble={f.get('ensemble')}"
    matcher = f"{m['name']}/{m['metric']}"
    if m.get("ratio_threshold"):
        matcher += f" ratio={m['ratio_threshold']}"
    return f"keypoints={k['name']}/{k.get('max_keypoints')} featurizer={desc} matcher={matcher}"
