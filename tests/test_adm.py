"""Tests of the ADM UNet and the DIFT-ADM featurizer (small models only; the real one on meta)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dift_sfm.errors import ModelLoadError
from dift_sfm.featurizers import get_featurizer
from dift_sfm.featurizers.adm import adm_dift_features, load_adm
from dift_sfm.models.adm import ADMConfig, ADMUNet, AttentionBlock

CONFORMANCE = Path(
    os.environ.get("DIFT_SFM_CONFORMANCE_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
) / "adm"
SMALL = CONFORMANCE / "adm_small_a.json"
SMALL_WEIGHTS = CONFORMANCE / "adm_small_a_weights.safetensors"


def _vectors() -> list[str]:
    """Names of the complete vector triples NAME.json + NAME_weights/_io.safetensors."""
    if not CONFORMANCE.is_dir():
        return []
    return sorted(p.stem for p in CONFORMANCE.glob("*.json")
                  if (CONFORMANCE / f"{p.stem}_weights.safetensors").is_file()
                  and (CONFORMANCE / f"{p.stem}_io.safetensors").is_file())


needs_small = pytest.mark.skipif(
    not SMALL_WEIGHTS.is_file(), reason=f"ADM conformance model not found in {CONFORMANCE}"
)

TINY_FLAGS = {  # a random-weight model for checks that need no reference numbers
    "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
    "attention_resolutions": "16", "num_heads": 2, "num_head_channels": -1,
    "learn_sigma": False, "use_scale_shift_norm": False, "resblock_updown": False,
    "use_new_attention_order": True,
}


def _random_model(flags: dict, seed: int = 0) -> ADMUNet:
    torch.manual_seed(seed)
    model = ADMUNet(ADMConfig.from_flags(flags)).eval()
    with torch.no_grad():  # the original zero-initialises some convs: make every layer count
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_state_dict_matches_real_checkpoint():
    path = CONFORMANCE / "adm256_uncond_state_dict.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    ref = json.loads(path.read_text())
    with torch.device("meta"):
        model = ADMUNet(ADMConfig.from_flags(ref["flags"]))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    # Output block 11 of the real model: 512 channels at stride 2.
    assert (model.output_channels[11], model.output_ds[11]) == (512, 2)


@pytest.mark.parametrize("name", _vectors() or [None])
def test_adm_conformance(name):
    if name is None:
        pytest.skip(f"No ADM conformance vectors (NAME.json + NAME_weights.safetensors + "
                    f"NAME_io.safetensors) in {CONFORMANCE}; set DIFT_SFM_CONFORMANCE_DIR.")
    from safetensors.torch import load_file

    spec = json.loads((CONFORMANCE / f"{name}.json").read_text())
    model = load_adm(CONFORMANCE / f"{name}_weights.safetensors", spec["flags"])
    io = load_file(str(CONFORMANCE / f"{name}_io.safetensors"))
    assert spec["cases"]
    for case in spec["cases"]:
        noise = io[case["noise"]]
        assert noise.shape[0] == case["ensemble"]
        out = adm_dift_features(model, io["image"], case["t"], case["output_block"], noise)
        expected = io[case["features"]]
        assert list(out.shape) == list(expected.shape) == case["shape"]
        err = (out - expected).abs().max().item()
        assert err < 1e-4, f"{name} case t={case['t']} block={case['output_block']}: {err}"


def test_early_exit_equals_full_network():
    """``features`` (skips dropped, early exit) equals the block output inside ``forward``."""
    model = _random_model(TINY_FLAGS)
    x = torch.randn(2, 3, 32, 64)
    for block in range(len(model.output_blocks)):
        seen: dict[str, torch.Tensor] = {}
        hook = model.output_blocks[block].register_forward_hook(
            lambda _m, _i, out, seen=seen: seen.setdefault("h", out))
        with torch.no_grad():
            full = model(x, torch.tensor([3, 500]))
            early = model.features(x, torch.tensor([3, 500]), block)
        hook.remove()
        assert full.shape == (2, 3, 32, 64)  # learn_sigma False: 3 output channels
        assert early.shape[1] == model.output_channels[block]
        torch.testing.assert_close(early, seen["h"], rtol=0, atol=1e-6)


def test_variant_flags_naming_and_attention():
    """Non-updown resampling names its convs like the checkpoints; attention orders agree."""
    model = _random_model(TINY_FLAGS)
    names = set(model.state_dict())
    assert "input_blocks.2.0.op.weight" in names  # strided-conv downsample
    assert "output_blocks.1.2.conv.weight" in names  # upsample conv after the attention
    assert "input_blocks.1.0.emb_layers.1.weight" in names
    assert model.input_blocks[1][0].emb_layers[1].out_features == 32  # no scale-shift

    block: AttentionBlock = model.input_blocks[3][1]  # 64 channels, 2 heads of 32
    x = torch.randn(1, 64, 4, 6)
    with torch.no_grad():
        out = block(x)
        # Reference: attention written out with einsum, [q | k | v] channel order (new order).
        flat = x.reshape(1, 64, -1)
        q, k, v = block.qkv(block.norm(flat)).chunk(3, dim=1)
        heads, ch = 2, 32
        q, k, v = (z.reshape(heads, ch, -1) for z in (q, k, v))
        w = torch.softmax(torch.einsum("hct,hcs->hts", q, k) / ch**0.5, dim=-1)
        a = torch.einsum("hts,hcs->hct", w, v).reshape(1, 64, -1)
        ref = (flat + block.proj_out(a)).reshape(x.shape)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_small
def test_featurizer_end_to_end(tmp_path):
    conf = {"name": "adm", "model": str(SMALL_WEIGHTS), "img_size": [96, 64], "t": 41,
            "output_block": 7, "ensemble": 2, "seed": 3, "device": "cpu"}
    feat = get_featurizer(conf)  # flags found next to the weights (adm_small_a.json)
    assert feat.descriptor_dim == 32
    rng = np.random.default_rng(0)
    image = rng.random((50, 80, 3), dtype=np.float32)  # non-square, resized to 96x64
    dense = feat.dense(image)
    assert dense.features.shape == (32, 32, 48)  # output block 7: stride 2
    assert dense.stride == (2.0, 2.0)
    assert dense.image_size == (80, 50) and dense.input_size == (96, 64)
    # Same seed -> same features; another seed -> other noise, other features.
    torch.testing.assert_close(feat.dense(image).features, dense.features, rtol=0, atol=0)
    other = get_featurizer({**conf, "seed": 4}).dense(image).features
    assert (other - dense.features).abs().max() > 1e-4
    # Ensemble chunking gives the same features.
    chunked = get_featurizer({**conf, "chunk_size": 1}).dense(image).features
    torch.testing.assert_close(chunked, dense.features, rtol=1e-5, atol=1e-5)

    kpts = np.array([[0, 0], [79, 49], [40.5, 20.25], [10, 30]], np.float32)
    desc = feat.describe(image, kpts)
    assert desc.shape == (4, 32) and desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1, rtol=1e-5)
    # A keypoint at the centre of feature cell (i, j) takes that cell's value.
    i, j = 5, 7
    x, y = (j + 0.5) * 80 / 48 - 0.5, (i + 0.5) * 50 / 32 - 0.5
    cell = F.normalize(dense.features[:, i, j], dim=0).numpy()
    np.testing.assert_allclose(feat.describe(image, np.array([[x, y]], np.float32))[0], cell,
                               atol=1e-5)

    # The same weights as a .pt file with a flags json next to it.
    from safetensors.torch import load_file

    torch.save(load_file(str(SMALL_WEIGHTS)), tmp_path / "small.pt")
    (tmp_path / "small.json").write_text(SMALL.read_text())
    pt = get_featurizer({**conf, "model": str(tmp_path / "small.pt")}).dense(image)
    torch.testing.assert_close(pt.features, dense.features, rtol=0, atol=0)


@needs_small
def test_bf16_close_to_fp32():
    conf = {"name": "adm", "model": str(SMALL_WEIGHTS), "img_size": [64, 64], "ensemble": 1,
            "device": "cpu"}
    image = np.random.default_rng(1).random((64, 64, 3), dtype=np.float32)
    ref = get_featurizer({**conf, "dtype": "float32"}).dense(image).features
    bf16 = get_featurizer({**conf, "dtype": "bfloat16"}).dense(image).features
    assert bf16.dtype == torch.float32
    rel = ((bf16 - ref).norm() / ref.norm()).item()
    assert rel < 0.03, rel
    cos = F.cosine_similarity(bf16.flatten(1), ref.flatten(1), dim=0)
    assert cos.min() > 0.99


def test_missing_checkpoint_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelLoadError, match="nope.pt"):
        load_adm(missing)
    monkeypatch.setenv("DIFT_SFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIFT_SFM_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="256x256_diffusion_uncond.pt") as info:
        get_featurizer({"name": "adm", "model": None})
    assert str(tmp_path / "cache") in str(info.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="bad.pt"):
        load_adm(bad)


@needs_small
def test_wrong_flags_error():
    with pytest.raises(ModelLoadError, match="adm_small_a_weights.safetensors"):
        load_adm(SMALL_WEIGHTS, flags={"num_channels": 64, "channel_mult": "1,1,2,2",
                                       "image_size": 64})


@needs_small
def test_oom_halves_chunk(monkeypatch):
    """On CUDA out-of-memory the ensemble is split into smaller chunks, same result."""
    from dift_sfm.featurizers.adm import _dift_features

    model = load_adm(SMALL_WEIGHTS)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand((1, 3, 32, 32), generator=gen) * 2 - 1
    noise = torch.randn((3, 3, 32, 32), generator=gen)
    ref = adm_dift_features(model, image, 41, 9, noise)
    features = model.features

    def small_batches_only(x, t, block):  # a device that fits one member at a time
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return features(x, t, block)

    monkeypatch.setattr(model, "features", small_batches_only)
    out, chunk = _dift_features(model, image, 41, 9, noise, None, False)
    assert chunk == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@needs_small
def test_compile_path_and_eager_fallback(monkeypatch, caplog):
    """compile=True traces ``features`` (dynamo, eager backend here: no C++/triton on CI) and
    a compiler failure on the first call falls back to eager with a warning, same features."""
    import logging

    from dift_sfm import runtime

    conf = {"name": "adm", "model": str(SMALL_WEIGHTS), "img_size": [64, 64], "ensemble": 2,
            "device": "cpu", "output_block": 7}
    image = np.random.default_rng(2).random((64, 64, 3), dtype=np.float32)
    eager = get_featurizer(conf)
    assert not eager.compiler.active and not eager.channels_last  # auto: off on CPU
    ref = eager.dense(image).features

    torch._dynamo.reset()
    monkeypatch.setattr(runtime.Compiler, "_options", lambda self: {"backend": "eager"})
    traced = get_featurizer({**conf, "compile": True})
    assert traced.compiler.active
    torch.testing.assert_close(traced.dense(image).features, ref, rtol=1e-5, atol=1e-6)

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler (test)")

    torch._dynamo.reset()
    monkeypatch.setattr(runtime.Compiler, "_options", lambda self: {"backend": broken})
    failing = get_featurizer({**conf, "compile": True, "channels_last": True})
    with caplog.at_level(logging.WARNING, logger="dift_sfm"):
        got = failing.dense(image).features
    assert "running it eagerly" in caplog.text and not failing.compiler.active
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_img_size_reading():
    """``img_size`` is read as for DIFT-SD: null = the image's size, an int = longer side."""
    model = _random_model(TINY_FLAGS)
    from dift_sfm.featurizers.adm import ADMFeaturizer

    feat = ADMFeaturizer.__new__(ADMFeaturizer)
    feat.model = model
    assert model.config.size_multiple == 2
    for spec, want in ((None, (100, 70)), (96, (96, 68)), ([64, None], (64, 44)),
                       ([96, 32], (96, 32))):
        feat.conf = {"img_size": spec}
        assert feat.input_size((100, 70)) == want
