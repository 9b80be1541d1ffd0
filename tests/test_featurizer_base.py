"""Shared featurizer mechanics: defaults, sizes, seeded draws, OOM halving, compile fallback."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from dift_sfm.errors import DiftSfmError
from dift_sfm.featurizers import featurizer_defaults, get_featurizer
from dift_sfm.featurizers.base import image_to_tensor, input_size, seeded_normal
from dift_sfm.models.weights import read_state_dict
from dift_sfm.runtime import (
    Compiler,
    OutOfMemoryError,
    cache_dir,
    halve_on_oom,
    resolve_flag,
    setup_compile_cache,
)


@pytest.mark.parametrize("name", ["sift", "sd", "adm"])
def test_defaults_list_every_key(name):
    conf = featurizer_defaults(name)
    assert conf["name"] == name and conf["batch_size"] == 1
    conf["batch_size"] = 9  # a deep copy: the class attribute is unchanged
    assert featurizer_defaults(name)["batch_size"] == 1
    if name != "sift":
        assert {"compile", "channels_last", "img_size", "seed", "device", "dtype",
                "chunk_size"} <= set(conf)
        assert conf["compile"] == "auto" and conf["channels_last"] == "auto"


def test_unknown_names_and_keys():
    with pytest.raises(DiftSfmError, match="sift, sd, adm"):
        featurizer_defaults("nope")
    with pytest.raises(DiftSfmError, match="rooot"):
        get_featurizer({"name": "sift", "rooot": False})
    assert get_featurizer({"name": "sift", "batch_size": 3}).batch_size == 3


def test_featurizer_modules_import_no_diffusers():
    import subprocess

    code = ("import sys, dift_sfm.featurizers as f; [f.featurizer_defaults(n) for n in "
            "('sift', 'sd', 'adm')]; print(sorted(m for m in ('diffusers', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sd_model_defined_once():
    from dift_sfm.featurizers.sd import SDFeaturizer
    from dift_sfm.models import sd

    assert SDFeaturizer.default_conf["model"] == sd.SD_MODEL
    assert not hasattr(sd, "DEFAULT_MODEL")


@pytest.mark.parametrize("spec, wh, multiple, want", [
    ([768, 768], (1000, 500), 64, (768, 768)),
    ([768, None], (1000, 500), 64, (768, 384)),
    ([None, 384], (1000, 500), 64, (768, 384)),
    (768, (480, 640), 64, (576, 768)),
    (None, (100, 50), 32, (96, 64)),
    ([96, 64], (80, 50), 32, (96, 64)),
])
def test_input_size(spec, wh, multiple, want):
    assert input_size(spec, wh, multiple) == want


@pytest.mark.parametrize("spec", [[100, 96], [None, None], "big", [1, 2, 3]])
def test_input_size_errors(spec):
    with pytest.raises(DiftSfmError, match="img_size"):
        input_size(spec, (100, 100), 32)


def test_image_to_tensor_range_and_size():
    img = np.random.default_rng(0).random((30, 40, 3), dtype=np.float32)
    same = image_to_tensor(img, (40, 30), "cpu")
    assert same.shape == (1, 3, 30, 40)
    torch.testing.assert_close(same[0].permute(1, 2, 0), torch.from_numpy(img) * 2 - 1)
    small = image_to_tensor(img, (16, 8), "cpu")
    assert small.shape == (1, 3, 8, 16) and small.min() >= -1 and small.max() <= 1


def test_seeded_normal_skips_disabled_draws():
    a, none, b = seeded_normal(3, [(2, 4), None, (5,)])
    assert none is None
    gen = torch.Generator().manual_seed(3)
    torch.testing.assert_close(a, torch.randn((2, 4), generator=gen), rtol=0, atol=0)
    torch.testing.assert_close(b, torch.randn((5,), generator=gen), rtol=0, atol=0)


def test_resolve_flag():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_flag("auto", cuda) and not resolve_flag("auto", cpu)
    assert resolve_flag(True, cpu) and not resolve_flag(False, cuda)
    assert resolve_flag("on", cpu) and not resolve_flag("false", cuda)
    with pytest.raises(DiftSfmError):
        resolve_flag("maybe", cpu)


def test_halve_on_oom(caplog):
    seen = []

    def run(chunk):
        seen.append(chunk)
        if chunk > 2:
            raise OutOfMemoryError("CUDA out of memory (test)")
        return chunk * 10

    with caplog.at_level(logging.WARNING, logger="dift_sfm"):
        assert halve_on_oom(run, 9, torch.device("cpu")) == (20, 2)
    assert seen == [9, 4, 2] and "Out of GPU memory" in caplog.text

    def never(chunk):
        raise OutOfMemoryError("always")

    with pytest.raises(OutOfMemoryError):
        halve_on_oom(never, 4, torch.device("cpu"))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x))

    def twice(self, x):
        return self.forward(x) * 2


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here (test)")


def test_compiler_traces_and_falls_back(caplog):
    net, x = _Net(), torch.randn(3, 4)
    ref, ref2 = net(x), net.twice(x)
    ok = Compiler("net", backend="eager")  # dynamo traces; no C++/triton needed
    ok.module(net)
    ok.method(net, "twice")
    assert ok.active
    torch.testing.assert_close(ok.run(lambda: net(x)), ref)
    torch.testing.assert_close(ok.run(lambda: net.twice(x)), ref2)
    ok.to_eager()
    assert not ok.active and "twice" not in vars(net) and net._compiled_call_impl is None

    torch._dynamo.reset()
    bad = Compiler("net", backend=_failing_backend)
    bad.module(net)
    with caplog.at_level(logging.WARNING, logger="dift_sfm"):
        torch.testing.assert_close(bad.run(lambda: net(x)), ref)
    assert "running it eagerly" in caplog.text and not bad.active
    with pytest.raises(ValueError):  # eager errors still surface
        bad.run(lambda: (_ for _ in ()).throw(ValueError("real error")))


def test_cache_dir_and_compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFT_SFM_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert cache_dir() == tmp_path / "c"
    folder = setup_compile_cache()
    assert folder == tmp_path / "c" / "torch_compile" and folder.is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert setup_compile_cache() == tmp_path / "mine"  # the user's choice wins


def test_read_state_dict(tmp_path):
    from safetensors.torch import save_file

    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == {"a", "b"}
        torch.testing.assert_close(got["a"], state["a"])
    (tmp_path / "bad.pt").write_bytes(b"nope")
    from dift_sfm.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="bad.pt"):
        read_state_dict(tmp_path / "bad.pt")
