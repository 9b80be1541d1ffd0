"""Named confs and their resolution (``dift_sfm.confs``), and the one list of conf sections
that the features file, the resume rule and the benchmarks' cache names share."""

import json

import pytest

from dift_sfm.confs import SECTIONS, ConfError, confs, get_conf, resolve_conf
from dift_sfm.errors import DiftSfmError
from dift_sfm.eval.cache import conf_tag
from dift_sfm.formats.features import FEATURE_SECTIONS, feature_settings
from dift_sfm.formats.resume import CONF_SECTIONS, RUNTIME_KEYS


def test_unknown_conf_and_section():
    with pytest.raises(DiftSfmError, match="Unknown conf 'nope'"):
        get_conf("nope")
    with pytest.raises(DiftSfmError, match="Unknown conf section"):
        get_conf("sift", {"nosuch.field": 1})


def test_conf_overrides_are_deep_copies():
    conf = get_conf("dift-sd", {"featurizer.t": 41, "keypoints.max_keypoints": 10})
    assert conf["featurizer"]["t"] == 41 and get_conf("dift-sd")["featurizer"]["t"] == 0
    assert conf["keypoints"]["max_keypoints"] == 10
    assert get_conf("sift")["keypoints"]["max_keypoints"] == 4096
    assert "max_keypoints" not in confs["sift"]["keypoints"]  # named confs only override


def test_valid_keys_are_listed_and_a_new_component_brings_its_own_keys():
    with pytest.raises(ConfError, match="Valid: .*contrast_threshold.*max_keypoints"):
        get_conf("sift", {"keypoints.max_keypoint": 1})
    grid = get_conf("sift", {"keypoints.name": "grid"})
    assert grid["keypoints"]["step"] == 16 and "contrast_threshold" not in grid["keypoints"]
    with pytest.raises(ConfError, match="keypoints.contrast_threshold"):
        get_conf("sift", {"keypoints.name": "grid", "keypoints.contrast_threshold": 0.1})
    assert resolve_conf({"featurizer": {"name": "sift"}})["matcher"]["metric"] == "cosine"


def test_auto_options_take_auto_or_their_type():
    assert get_conf("sift")["matcher"]["cache_mb"] == "auto"
    assert resolve_conf({"name": "x"}, {"matcher.cache_mb": 512})["matcher"]["cache_mb"] == 512
    assert get_conf("sift", {"matcher.cache_mb": "auto"})["matcher"]["cache_mb"] == "auto"
    for bad in ("lots", 1.5, True, [64]):
        with pytest.raises(ConfError, match="matcher.cache_mb"):
            get_conf("sift", {"matcher.cache_mb": bad})
    with pytest.raises(ConfError, match="matcher.pair_batch"):
        get_conf("sift", {"matcher.pair_batch": "many"})
    assert get_conf("sift", {"matcher.device": "cuda:1"})["matcher"]["device"] == "cuda:1"


def test_one_list_of_sections():
    """confs resolves, extract stores and the cache tag hashes the same sections."""
    assert tuple(SECTIONS) == CONF_SECTIONS
    assert set(FEATURE_SECTIONS) == set(CONF_SECTIONS) - {"matcher"}
    conf = get_conf("sift")
    assert tuple(k for k in conf if k in CONF_SECTIONS) == CONF_SECTIONS
    assert tuple(feature_settings(conf)) == FEATURE_SECTIONS


@pytest.mark.parametrize("runtime", [
    {"matcher.device": "cpu"}, {"matcher.cache_mb": 64}, {"matcher.pair_batch": 4},
    {"featurizer.batch_size": 2}, {"preprocessing.num_workers": 0},
])
def test_conf_tag_follows_the_resume_rule(runtime):
    """Runtime keys (where and how fast) keep the benchmarks' cached files; anything that
    changes the features or matches gets new ones."""
    assert {k.split(".")[-1] for k in runtime} <= RUNTIME_KEYS
    base = get_conf("sift")
    assert conf_tag(get_conf("sift", runtime)) == conf_tag(base)
    for significant in ({"matcher.ratio_threshold": 0.9}, {"keypoints.max_keypoints": 100},
                        {"preprocessing.resize_max": 800}):
        assert conf_tag(get_conf("sift", significant)) != conf_tag(base)
    tag = conf_tag(base)
    assert tag.startswith("sift-") and len(tag) == len("sift-") + 8
    # JSON round trip (a conf read back from a file) gives the same tag
    assert conf_tag(json.loads(json.dumps(base))) == tag
