"""DIFT-SD featurizer: conformance vectors, early exit, determinism, model loading, CLI."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from conftest import texture
from safetensors.torch import load_file, save_file

from dift_sfm.errors import DiftSfmError, ModelLoadError
from dift_sfm.featurizers.sd import (
    SDFeaturizer,
    input_size,
    sd_dift_features,
    unet_up_block_output,
)
from dift_sfm.models import sd as sd_models
from dift_sfm.models.sd import load_sd_model, load_unet_weights

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = Path(os.environ.get("DIFT_SFM_CONFORMANCE_DIR",
                                  REPO.parent / "shared" / "conformance")) / "sd"


def vector_folders(root: Path) -> list[Path]:
    """Every folder below (or at) ``root`` with model/, io.safetensors and cases.json."""
    if not root.is_dir():
        return []
    candidates = [root, *sorted(p.parent for p in root.rglob("cases.json"))]
    found = [p for p in dict.fromkeys(candidates)
             if (p / "model").is_dir() and (p / "io.safetensors").is_file()
             and (p / "cases.json").is_file()]
    return found


FOLDERS = vector_folders(CONFORMANCE)


@pytest.fixture(scope="module")
def tiny() -> Path:
    """The tiny SD-2.1-layout model folder of the first conformance vector folder."""
    if not FOLDERS:
        pytest.skip(f"no DIFT-SD conformance vectors at {CONFORMANCE} (set "
                    f"DIFT_SFM_CONFORMANCE_DIR to a folder holding sd/<model, io.safetensors, "
                    f"cases.json>)")
    return FOLDERS[0] / "model"


@pytest.fixture(scope="module")
def tiny_model(tiny: Path):
    emb = load_file(str(tiny.parent / "io.safetensors"))["prompt_embeds"]
    return load_sd_model(tiny, prompt_embeds=emb)


@pytest.fixture
def embeds_file(tiny: Path, tmp_path: Path) -> Path:
    path = tmp_path / "prompt.safetensors"
    save_file({"prompt_embeds": load_file(str(tiny.parent / "io.safetensors"))["prompt_embeds"]},
              str(path))
    return path


def test_sd_conformance():
    if not FOLDERS:
        pytest.skip(f"no DIFT-SD conformance vectors found under {CONFORMANCE} (a vector folder "
                    f"has model/, io.safetensors, cases.json; set DIFT_SFM_CONFORMANCE_DIR)")
    n_cases = 0
    for folder in FOLDERS:
        io = load_file(str(folder / "io.safetensors"))
        spec = json.loads((folder / "cases.json").read_text())
        model = load_sd_model(folder / "model", prompt_embeds=io["prompt_embeds"])
        for case in spec["cases"]:
            eps, noise = io[case["vae_eps"]], io[case["noise"]]
            assert eps.shape[0] == case["ensemble"]
            for chunk in (None, 1):  # one batched call, and one member per call
                got = sd_dift_features(model.unet, model.vae, model.scheduler, io["image"],
                                       model.prompt_embeds, case["t"], case["up_ft_index"], eps,
                                       noise, spec.get("scaling_factor", 0.18215),
                                       chunk_size=chunk)
                want = io[case["features"]]
                assert tuple(got.shape) == tuple(case["shape"]) == tuple(want.shape)
                err = (got - want).abs().max().item()
                assert err < 1e-4, f"{folder} case {case}: max abs error {err}"
            n_cases += 1
    assert n_cases > 0


def _inputs(model, n: int = 2, hw=(16, 24), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.unet.config.in_channels, *hw, generator=gen)
    return x, model.prompt_embeds.expand(n, -1, -1)


def test_early_exit_equals_full_unet(tiny_model):
    unet = tiny_model.unet
    x, cond = _inputs(tiny_model)
    t = torch.tensor([3, 500])
    later_calls = []
    for idx in range(len(unet.up_blocks)):
        handles = [m.register_forward_hook(lambda *a: later_calls.append(1))
                   for m in [*unet.up_blocks[idx + 1:], unet.conv_out]]
        early = unet_up_block_output(unet, x, t, cond, idx, early_exit=True)
        for h in handles:
            h.remove()
        assert not later_calls, f"early exit at up_blocks[{idx}] still ran later modules"
        full = unet_up_block_output(unet, x, t, cond, idx, early_exit=False)
        torch.testing.assert_close(early, full, rtol=0, atol=0)
        assert early.shape[1] == list(reversed(unet.config.block_out_channels))[idx]
    # the hook is removed afterwards: a plain forward returns the UNet's noise prediction
    out = unet(x, t, encoder_hidden_states=cond).sample
    assert out.shape == x.shape


def test_no_noise_path_uses_posterior_mean(tiny_model):
    m = tiny_model
    image = torch.rand(1, 3, 128, 128) * 2 - 1
    clean = sd_dift_features(m.unet, m.vae, m.scheduler, image, m.prompt_embeds, 0, 2, None, None)
    latent = m.vae.encode(image).latent_dist.mean * m.scaling_factor
    direct = unet_up_block_output(m.unet, latent, torch.tensor([0]), m.prompt_embeds, 2)
    torch.testing.assert_close(clean, direct)


def _featurizer(tiny: Path, **conf) -> SDFeaturizer:
    base = {"model": str(tiny), "img_size": [128, 96], "ensemble": 2, "device": "cpu",
            "t": 41, "up_ft_index": 2}
    return SDFeaturizer({**base, **conf})


def test_seeded_determinism_and_batching(tiny: Path, embeds_file: Path):
    f = _featurizer(tiny, prompt_embeds=str(embeds_file), seed=3)
    img0 = texture(90, 120, seed=0).astype(np.float32) / 255
    img1 = texture(100, 140, seed=1).astype(np.float32) / 255
    a, b = f.dense(img0), f.dense(img0)
    torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)
    assert a.features.shape == (f.descriptor_dim, 12, 16) and a.features.dtype == torch.float32
    assert a.image_size == (120, 90) and a.input_size == (128, 96) and a.stride == (8.0, 8.0)
    # the featurizer is sd_dift_features with the generator's draws
    eps, noise = f.draw_randomness((12, 16))
    from dift_sfm.featurizers.sd import image_to_tensor

    x = image_to_tensor(img0, (128, 96), torch.device("cpu"))
    ref = sd_dift_features(f.unet, f.vae, f.scheduler, x, f.prompt_embeds, 41, 2, eps, noise)
    torch.testing.assert_close(a.features, ref[0])
    # another seed gives other features; batching does not change a result
    other = _featurizer(tiny, prompt_embeds=str(embeds_file), seed=4).dense(img0)
    assert (other.features - a.features).abs().max() > 1e-4
    batch = f.dense_batch([img0, img1, img0])
    torch.testing.assert_close(batch[0].features, a.features)
    torch.testing.assert_close(batch[2].features, a.features)
    torch.testing.assert_close(batch[1].features, f.dense(img1).features)
    desc = f.describe(img0, np.array([[0.0, 0.0], [60.5, 44.0]], np.float32))
    assert desc.shape == (2, f.descriptor_dim)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1, rtol=1e-5)


def test_out_of_memory_splits_the_ensemble(tiny: Path, embeds_file: Path, monkeypatch, caplog):
    import dift_sfm.featurizers.sd as sd_feat

    f = _featurizer(tiny, prompt_embeds=str(embeds_file), ensemble=4, chunk_size=4,
                    img_size=[64, 64])
    img = texture(64, 64).astype(np.float32) / 255
    want = f.dense(img).features
    real, chunks = sd_feat.sd_dift_features, []

    def flaky(*args, chunk_size=None, **kwargs):
        chunks.append(chunk_size)
        if chunk_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(sd_feat, "sd_dift_features", flaky)
    with caplog.at_level(logging.WARNING, logger="dift_sfm"):
        got = f.dense(img).features
    assert chunks == [4, 2, 1] and f.chunk_size == 1
    assert "Out of GPU memory" in caplog.text
    torch.testing.assert_close(got, want)


def test_zero_embedding_fallback_warns(tiny: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="dift_sfm"):
        f = _featurizer(tiny, ensemble=1, img_size=[64, 64])
    assert "zero embedding" in caplog.text
    assert torch.count_nonzero(f.prompt_embeds) == 0
    assert f.prompt_embeds.shape == (1, 77, f.unet.config.cross_attention_dim)


def test_clean_conf_single_member(tiny: Path, embeds_file: Path):
    f = _featurizer(tiny, prompt_embeds=str(embeds_file), ensemble=8, sample_posterior=False,
                    add_noise=False, t=0)
    assert f.ensemble == 1
    img = texture(64, 64).astype(np.float32) / 255
    torch.testing.assert_close(f.dense(img).features,
                               _featurizer(tiny, prompt_embeds=str(embeds_file), ensemble=1,
                                           sample_posterior=False, add_noise=False, t=0,
                                           seed=9).dense(img).features, rtol=0, atol=0)


@pytest.mark.parametrize("spec, wh, want", [
    ([768, 768], (1000, 500), (768, 768)),
    ([768, None], (1000, 500), (768, 384)),
    ([None, 384], (1000, 500), (768, 384)),
    (768, (480, 640), (576, 768)),
    (768, (1000, 10), (768, 64)),
])
def test_input_size(spec, wh, want):
    assert input_size(spec, wh, 64) == want


def test_bad_img_size_is_clear(tiny: Path, embeds_file: Path):
    f = _featurizer(tiny, prompt_embeds=str(embeds_file), img_size=[100, 96])
    with pytest.raises(DiftSfmError, match="multiples of 32"):
        f.dense(np.zeros((50, 50, 3), np.float32))


def test_load_from_local_folder(tiny: Path, tiny_model):
    m = tiny_model
    assert m.vae.decoder is None  # dropped: DIFT never decodes
    assert m.scaling_factor == pytest.approx(0.18215)
    assert m.scheduler.config.beta_schedule == "scaled_linear"
    assert m.unet.config.cross_attention_dim == m.prompt_embeds.shape[-1]


# --------------------------------------------------------------------------- single file
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _unet_key_to_ldm(key: str, config, has_attn) -> str:
    """diffusers UNet2DConditionModel key -> original LDM key (SD layout), for test files."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top:
        return top[key]
    p, per = key.split("."), config["layers_per_block"] + 1

    def sub(head: int, new: str, resnet: bool) -> str:
        rest = p[head:]
        if resnet:
            rest = [_RESNET.get(rest[0], rest[0]), *rest[1:]]
        return ".".join([new, *rest])

    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{1 + b * per + per - 1}.0.op." + ".".join(p[5:])
        i = 1 + b * per + int(p[3])
        return sub(4, f"input_blocks.{i}.{0 if p[2] == 'resnets' else 1}", p[2] == "resnets")
    if p[0] == "mid_block":
        j = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[p[1], int(p[2])]
        return sub(3, f"middle_block.{j}", p[1] == "resnets")
    b = int(p[1])  # up_blocks
    if p[2] == "upsamplers":
        slot = 2 if has_attn(b) else 1
        return f"output_blocks.{b * per + per - 1}.{slot}.conv." + ".".join(p[5:])
    i = b * per + int(p[3])
    return sub(4, f"output_blocks.{i}.{0 if p[2] == 'resnets' else 1}", p[2] == "resnets")


def _vae_key_to_ldm(key: str, value: torch.Tensor, n_blocks: int) -> tuple[str, torch.Tensor]:
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
        return key, value
    if p[1] == "conv_norm_out":
        return ".".join([p[0], "norm_out", *p[2:]]), value
    if p[1] in ("down_blocks", "up_blocks"):
        down = p[1] == "down_blocks"
        b = int(p[2]) if down else n_blocks - 1 - int(p[2])
        stage = f"{p[0]}.{'down' if down else 'up'}.{b}"
        if p[3] in ("downsamplers", "upsamplers"):
            return f"{stage}.{'downsample' if down else 'upsample'}.conv." + ".".join(p[6:]), value
        name = "nin_shortcut" if p[5] == "conv_shortcut" else p[5]
        return f"{stage}.block.{p[4]}.{name}." + ".".join(p[6:]), value
    if p[2] == "resnets":  # mid_block
        name = "nin_shortcut" if p[4] == "conv_shortcut" else p[4]
        return f"{p[0]}.mid.block_{int(p[3]) + 1}.{name}." + ".".join(p[5:]), value
    tail = p[6:] if p[4] == "to_out" else p[5:]
    value = value[:, :, None, None] if value.dim() == 2 else value  # LDM uses 1x1 convs
    return f"{p[0]}.mid.attn_1.{_VAE_ATTN[p[4]]}." + ".".join(tail), value


def write_ldm_checkpoint(unet, vae, path: Path) -> None:
    """Write ``unet`` + ``vae`` as one original-layout SD checkpoint (model.diffusion_model.*,
    first_stage_model.*), the format diffusers' single-file loaders read."""
    cfg = unet.config

    def has_attn(b):
        return hasattr(unet.up_blocks[b], "attentions")

    out = {"model.diffusion_model." + _unet_key_to_ldm(k, cfg, has_attn): v
           for k, v in unet.state_dict().items()}
    n = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        new, v = _vae_key_to_ldm(k, v, n)
        out["first_stage_model." + new] = v
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))


def test_load_single_file_checkpoint(tiny: Path, tmp_path: Path, embeds_file: Path):
    ref = load_sd_model(tiny, prompt_embeds=embeds_file, keep_decoder=True)
    ckpt = tmp_path / "tiny-sd.safetensors"
    write_ldm_checkpoint(ref.unet, ref.vae, ckpt)
    got = load_sd_model(ckpt, config=tiny, prompt_embeds=embeds_file, keep_decoder=True)
    for a, b in ((ref.unet, got.unet), (ref.vae, got.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    assert got.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
    # a checkpoint whose tensors do not fit the config fails clearly
    bad = tmp_path / "bad.safetensors"
    tensors = load_file(str(ckpt))
    key = next(k for k in tensors if k.endswith("input_blocks.1.0.in_layers.2.weight"))
    tensors[key] = torch.zeros(3, 3, 3, 3)
    save_file(tensors, str(bad))
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        load_sd_model(bad, config=tiny, prompt_embeds=embeds_file)
    # a checkpoint missing a tensor fails too (diffusers loads through accelerate, a dependency)
    del tensors[key]
    save_file(tensors, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="missing.safetensors"):
        load_sd_model(tmp_path / "missing.safetensors", config=tiny, prompt_embeds=embeds_file)


# --------------------------------------------------------------------------- UNet override
def test_unet_weights_override_strict(tiny: Path, tiny_model, tmp_path: Path,
                                      embeds_file: Path):
    state = {k: v.clone() + 0.01 for k, v in tiny_model.unet.state_dict().items()}
    good = tmp_path / "unet_override.safetensors"
    save_file(state, str(good))
    m = load_sd_model(tiny, unet_weights=str(good), prompt_embeds=embeds_file)
    for k, v in m.unet.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)

    wrong = dict(state)
    wrong["conv_in.weight_typo"] = wrong.pop("conv_in.weight")
    bad = tmp_path / "unet_wrong_key.safetensors"
    save_file(wrong, str(bad))
    with pytest.raises(ModelLoadError, match=r"conv_in\.weight_typo") as err:
        load_unet_weights(m.unet, bad)
    assert "missing keys: conv_in.weight" in str(err.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_unet_weights(m.unet, tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError, match="hf download no-such-owner/no-such-repo"):
        load_unet_weights(m.unet, {"repo": "no-such-owner/no-such-repo", "filename": "u.bin"})


# --------------------------------------------------------------------------- errors
def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_sd_model("no-such-owner-dift/no-such-model")
    msg = str(err.value)
    assert "no-such-owner-dift/no-such-model" in msg and "hf download" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_missing_local_paths(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_sd_model(tmp_path / "missing" / "model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_sd_model(str(tmp_path / "missing.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="unet/config.json is missing"):
        load_sd_model(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="does not exist"):
        sd_models.read_prompt_embeds(tmp_path / "none.safetensors")


# --------------------------------------------------------------------------- prompt cache
def _add_tiny_text_encoder(folder: Path, width: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = folder / "_vocab"
    tok_dir.mkdir()
    vocab = {"!": 0, '"': 1, "<|startoftext|>": 2, "<|endoftext|>": 3, "a</w>": 4}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="!",
                  model_max_length=77).save_pretrained(folder / "tokenizer")
    cfg = CLIPTextConfig(vocab_size=5, hidden_size=width, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(folder / "text_encoder")


def test_prompt_embedding_cache(tiny: Path, tmp_path: Path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("DIFT_SFM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "sd-with-text"
    shutil.copytree(tiny, folder)
    width = json.loads((tiny / "unet" / "config.json").read_text())["cross_attention_dim"]
    _add_tiny_text_encoder(folder, width)

    first = load_sd_model(folder)
    cache = sd_models.prompt_cache_path("folder", str(folder.resolve()))
    assert cache.is_file() and cache.parent == tmp_path / "cache" / "prompt_embeds"
    assert first.prompt_embeds.shape == (1, 77, width)
    assert torch.count_nonzero(first.prompt_embeds) > 0
    direct = sd_models.encode_prompt("folder", str(folder.resolve()))
    torch.testing.assert_close(first.prompt_embeds, direct)

    def no_text_encoder(*args, **kwargs):
        raise AssertionError("the text encoder must not be loaded when the cache exists")

    monkeypatch.setattr(sd_models, "encode_prompt", no_text_encoder)
    second = load_sd_model(folder)
    torch.testing.assert_close(second.prompt_embeds, first.prompt_embeds, rtol=0, atol=0)
    # another prompt is another cache entry (and would need the encoder)
    assert sd_models.prompt_cache_path("folder", str(folder), prompt="a") != cache
    with pytest.raises(AssertionError, match="must not be loaded"):
        load_sd_model(folder, prompt="a")
    # a given embedding file wins over everything; a wrong width is a clear error
    bad = tmp_path / "wrong.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 77, width + 1)}, str(bad))
    with pytest.raises(ModelLoadError, match="expects"):
        load_sd_model(folder, prompt_embeds=bad)


# --------------------------------------------------------------------------- end to end
def test_extract_cli_end_to_end(tiny: Path, tmp_path: Path):
    cli = pytest.importorskip("dift_sfm.cli")
    pytest.importorskip("dift_sfm.extract")
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(120, 160), (150, 110)]):
        cv2.imwrite(str(images / f"im{i}.png"), texture(h, w, seed=i))
    out = tmp_path / "feats.h5"
    rc = cli.main(["extract", str(images), "-o", str(out), "--conf", "dift-sd",
                   "--model", str(tiny), "--max-keypoints", "64", "--device", "cpu",
                   "--set", "featurizer.img_size=[128,128]", "--set", "featurizer.ensemble=2"])
    assert rc == 0
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["im0.png", "im1.png"]
        for name, (h, w) in (("im0.png", (120, 160)), ("im1.png", (150, 110))):
            g = f[name]
            n = g["keypoints"].shape[0]
            assert 0 < n <= 64 and g["keypoints"].shape == (n, 2)
            assert g["descriptors"].shape == (32, n)  # up_blocks[2] of the tiny UNet: 32 ch
            d = g["descriptors"][()].astype(np.float32)
            np.testing.assert_allclose(np.linalg.norm(d, axis=0), 1, rtol=1e-3)
            assert tuple(g["image_size"][()]) == (w, h)
            kp = g["keypoints"][()]
            assert kp[:, 0].max() < w and kp[:, 1].max() < h


def test_extract_batches_images_with_identical_results(tiny: Path, tmp_path: Path):
    """featurizer.batch_size > 1 shares UNet calls between images and changes nothing else."""
    from dift_sfm.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"im{i}.png"), texture(96, 128, seed=10 + i))
    common = ["--conf", "dift-sd", "--model", str(tiny), "--max-keypoints", "32", "--device",
              "cpu", "--set", "featurizer.img_size=[128,128]", "--set", "featurizer.ensemble=2"]
    assert main(["extract", str(images), "-o", str(tmp_path / "one.h5"), *common]) == 0
    assert main(["extract", str(images), "-o", str(tmp_path / "two.h5"), *common,
                 "--set", "featurizer.batch_size=2", "--set", "featurizer.chunk_size=4"]) == 0
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "two.h5") as b:
        for name in ("im0.png", "im1.png", "im2.png"):
            np.testing.assert_array_equal(a[name]["keypoints"][()], b[name]["keypoints"][()])
            np.testing.assert_allclose(a[name]["descriptors"][()], b[name]["descriptors"][()],
                                       atol=1e-5)


def test_compiled_blocks_equal_eager(tiny: Path, embeds_file: Path, monkeypatch, caplog):
    """compile_sd traces the blocks that run (dynamo; eager backend: no C++/triton here) with
    the early-exit hook in place; a failing compiler falls back to eager on the first call."""
    from dift_sfm import runtime

    img = texture(64, 64).astype(np.float32) / 255
    f = _featurizer(tiny, prompt_embeds=str(embeds_file), img_size=[64, 64])
    assert not f.compiler.active and not f.channels_last  # compile/channels_last auto: CPU off
    want = f.dense(img).features

    torch._dynamo.reset()
    options = runtime.Compiler._options
    monkeypatch.setattr(runtime.Compiler, "_options",
                        lambda self: {**options(self), "backend": "eager"})
    traced = _featurizer(tiny, prompt_embeds=str(embeds_file), img_size=[64, 64], compile=True)
    assert traced.compiler.active
    torch.testing.assert_close(traced.dense(img).features, want, rtol=1e-5, atol=1e-6)

    def broken(gm, example_inputs):
        raise RuntimeError("no triton (test)")

    torch._dynamo.reset()
    monkeypatch.setattr(runtime.Compiler, "_options", lambda self: {"backend": broken})
    failing = _featurizer(tiny, prompt_embeds=str(embeds_file), img_size=[64, 64], compile=True)
    with caplog.at_level(logging.WARNING, logger="dift_sfm"):
        got = failing.dense(img).features
    assert "running it eagerly" in caplog.text and not failing.compiler.active
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_compiled_blocks_do_not_recompile(tiny: Path, embeds_file: Path, monkeypatch):
    """Compiled (dynamo, eager backend) with the featurizer's options: another image of the
    same size reuses every graph, and batches of 2 and 3 images share one graph per block
    (dynamic batch dim); the features equal the eager ones."""
    from torch._dynamo.utils import counters

    from dift_sfm import runtime

    images = [texture(64, 64, seed=s).astype(np.float32) / 255 for s in range(5)]
    eager = _featurizer(tiny, prompt_embeds=str(embeds_file), img_size=[64, 64])
    want = [d.features for d in eager.dense_batch(images)]

    torch._dynamo.reset()
    counters.clear()
    options = runtime.Compiler._options
    monkeypatch.setattr(runtime.Compiler, "_options",
                        lambda self: {**options(self), "backend": "eager"})
    f = _featurizer(tiny, prompt_embeds=str(embeds_file), img_size=[64, 64], compile=True,
                    compile_dynamic_batch=True, batch_size=3)
    assert f.compiler.active and f.compiler.dynamic_batch

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    got = [f.dense(images[0]).features]
    n_single = graphs()
    got.append(f.dense(images[1]).features)
    assert graphs() == n_single  # same size, batch 1: no recompile
    got += [d.features for d in f.dense_batch(images[2:4])]
    n_batch = graphs()
    got += [d.features for d in f.dense_batch(images[:3])]
    assert graphs() == n_batch  # batch 3 reuses batch 2's graphs
    assert f.compiler.active
    for g, w in zip(got, [*want[:4], *want[:3]], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_batch_size_sets_default_chunk(tiny: Path, embeds_file: Path):
    f = _featurizer(tiny, prompt_embeds=str(embeds_file), ensemble=2, batch_size=3)
    assert f.batch_size == 3 and f.chunk_size == 6


def test_load_time_is_logged(tiny: Path, embeds_file: Path, caplog):
    with caplog.at_level(logging.INFO, logger="dift_sfm"):
        load_sd_model(tiny, prompt_embeds=embeds_file)
    assert "Loaded" in caplog.text and " s." in caplog.text
