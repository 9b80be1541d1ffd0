"""Benchmark the DIFT-ADM forward: our ADM UNet against the public algorithm's cost profile.

Builds the real 256x256-uncond architecture (552M parameters) with random weights (nothing is
downloaded) and, on one device in one run, times
- ``legacy``: a straightforward forward written here: float32, einsum QKV attention, every skip
  kept, the whole network run (noise head included) and the block output taken on the way;
- ``ours``: ``dift_sfm.featurizers.adm.adm_dift_features`` (compute dtype of choice, SDPA
  attention, early exit, unused skips dropped, optional ensemble chunking / channels_last),
and checks that both give the same features. Peak memory: CUDA ``max_memory_allocated`` on
GPU, peak RSS (sampled) on CPU, both above the memory held before the forward (weights etc.).

``ours`` uses the featurizer's defaults: ``--channels-last`` and ``--compile`` are ``auto`` (on
for CUDA), compiled as ``ADMFeaturizer`` does (with its eager fallback). The legacy row keeps
PyTorch's defaults (as the public code does): TF32 off for matmuls, cuDNN's default for convs.
``--arch tiny`` uses a small model (smoke tests); ``--write-model FILE.safetensors`` saves the
random weights (+ ``FILE.json`` flags) for ``dift-sfm extract --conf dift-adm`` and exits.

    python benchmarks/bench_adm.py --device cpu --size 256 --ensemble 1            # CPU
    python benchmarks/bench_adm.py --device cuda --size 768 --ensemble 4 --dtype bf16  # paper

Each measurement is printed at once as a JSON line ``{"variant": ..., "stage": ...}`` (flushed),
so a run cut short keeps what it measured; the last line is the summary JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dift_sfm.featurizers.adm import adm_dift_features  # noqa: E402
from dift_sfm.models.adm import (  # noqa: E402
    ADM_256_UNCOND_FLAGS,
    ADMConfig,
    ADMUNet,
    AttentionBlock,
    Resample,
    ResBlock,
    alphas_cumprod,
    timestep_embedding,
)
from dift_sfm.runtime import (  # noqa: E402
    Compiler,
    resolve_device,
    resolve_dtype,
    resolve_flag,
    setup_compile_cache,  # noqa: E402
)

GiB = 2**30
# A small model of the same family for smoke tests (inputs: multiples of 8).
TINY_FLAGS = {**ADM_256_UNCOND_FLAGS, "image_size": 64, "num_channels": 32,
              "channel_mult": "1,2,2,2", "num_res_blocks": 1, "num_head_channels": 16,
              "attention_resolutions": "16,8"}
ARCHS = {"adm256": ADM_256_UNCOND_FLAGS, "tiny": TINY_FLAGS}


# --------------------------------------------------------------------------- legacy forward
def _norm(layer: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x.float(), layer.num_groups, layer.weight, layer.bias, layer.eps)


def _legacy_resblock(block: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = F.silu(_norm(block.in_layers[0], x))
    if block.resample is not None:
        h, x = block.resample(h), block.resample(x)
    h = block.in_layers[2](h)
    e = block.emb_layers(emb)[..., None, None]
    if block.use_scale_shift_norm:
        scale, shift = e.chunk(2, dim=1)
        h = _norm(block.out_layers[0], h) * (1 + scale) + shift
    else:
        h = _norm(block.out_layers[0], h + e)
    return block.skip_connection(x) + block.out_layers[3](F.silu(h))


def _legacy_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, -1)
    qkv = block.qkv(_norm(block.norm, x))
    heads, ch = block.num_heads, c // block.num_heads
    if block.new_order:
        q, k, v = (z.reshape(b * heads, ch, -1) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    scale = ch**-0.25
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    return (x + block.proj_out(a)).reshape(b, c, hh, ww)


def _legacy_seq(seq: nn.Sequential, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    for layer in seq:
        if isinstance(layer, ResBlock):
            h = _legacy_resblock(layer, h, emb)
        elif isinstance(layer, AttentionBlock):
            h = _legacy_attention(layer, h)
        elif isinstance(layer, (nn.Conv2d, Resample)):
            h = layer(h)
        else:
            raise TypeError(type(layer))
    return h


def legacy_dift_features(model: ADMUNet, image: torch.Tensor, t: int, output_block: int,
                         noise: torch.Tensor) -> torch.Tensor:
    """The public algorithm's cost profile: (1, 3, H, W) + noise (E, 3, H, W) -> (1, C, h, w)."""
    abar = float(alphas_cumprod(model.config)[t])
    x = abar**0.5 * image + (1 - abar) ** 0.5 * noise
    tt = torch.full((x.shape[0],), t, device=x.device)
    emb = model.time_embed(timestep_embedding(tt, model.config.model_channels))
    skips, h = [], x
    for block in model.input_blocks:
        h = _legacy_seq(block, h, emb)
        skips.append(h)
    h = _legacy_seq(model.middle_block, h, emb)
    feats = None
    for j, block in enumerate(model.output_blocks):
        h = _legacy_seq(block, torch.cat([h, skips.pop()], dim=1), emb)
        if j == output_block:
            feats = h
    model.out[2](F.silu(_norm(model.out[0], h)))  # the noise prediction, computed and dropped
    return feats.mean(0, keepdim=True)


# --------------------------------------------------------------------------- measurement
def random_model(device: torch.device, seed: int = 0, arch: str = "adm256") -> ADMUNet:
    """The real 256x256-uncond architecture with random float32 weights (no download)."""
    with torch.device("meta"):
        model = ADMUNet(ADMConfig.from_flags(ARCHS[arch]))
    model = model.to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 / p[0].numel() ** 0.5, generator=gen)
            elif "norm" in name or "layers.0" in name or name.startswith("out.0"):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    return model


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int,
            warmup: int) -> tuple[torch.Tensor, float, float, float]:
    """Run ``fn``; return (output, wall ms per call, process CPU s per call, peak memory in GiB
    above the pre-call level). CPU time is robust to other jobs sharing the cores."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base, peak, stop = _rss(), [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        out = fn()
    sync()
    ms = (time.perf_counter() - start) / repeats * 1000
    cpu_s = (time.process_time() - cpu_start) / repeats
    if device.type == "cuda":
        mem = (torch.cuda.max_memory_allocated() - base) / GiB
    else:
        stop.set()
        sampler.join()
        mem = (max(peak[0], _rss()) - base) / GiB
    return out, ms, cpu_s, mem


def write_model(path: str | Path, arch: str = "adm256", device: str = "auto") -> Path:
    """Save random weights (fp16 safetensors) and the flags json beside them (``NAME.json``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = random_model(resolve_device(device), arch=arch)
    save_file({k: v.half().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))
    path.with_name(path.name.split(".")[0] + ".json").write_text(json.dumps(ARCHS[arch]))
    return path


def emit(record: dict) -> None:
    """Print ``record`` as one JSON line, flushed (the log keeps it even if the run is killed)."""
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="input side (square), px")
    parser.add_argument("--ensemble", type=int, default=1)
    parser.add_argument("--t", type=int, default=41)
    parser.add_argument("--block", type=int, default=None,
                        help="output block (default 11; the last one for --arch tiny)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="ours: auto (bf16 on CUDA), fp32, bf16")
    parser.add_argument("--chunk", type=int, default=None, help="ours: members per pass")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                        help="ours (auto: on CUDA)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="ours: torch.compile (auto: on CUDA)")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--arch", default="adm256", choices=sorted(ARCHS))
    parser.add_argument("--write-model", metavar="FILE.safetensors",
                        help="save random weights (+ flags json) and exit")
    parser.add_argument("--repeats", type=int, default=None, help="default: 1 CPU, 5 CUDA")
    parser.add_argument("--warmup", type=int, default=None, help="default: 0 CPU, 2 CUDA")
    parser.add_argument("--skip-legacy", action="store_true")
    args = parser.parse_args()
    if args.write_model:
        print(write_model(args.write_model, args.arch, args.device))
        return

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    repeats = args.repeats or (5 if device.type == "cuda" else 1)
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 0)
    # TF32 stays at PyTorch's default (off, as in the public code); not set here, since setting
    # it, even to its default, changes torch.compile's cache key: `extract` would not reuse
    # this run's compiled graphs
    channels_last = resolve_flag(args.channels_last, device)
    compile_ = resolve_flag(args.compile, device)

    model = random_model(device, arch=args.arch)
    if args.block is None:
        args.block = min(11, len(model.output_blocks) - 1)
    gen = torch.Generator().manual_seed(0)
    image = (torch.rand((1, 3, args.size, args.size), generator=gen) * 2 - 1).to(device)
    noise = torch.randn((args.ensemble, 3, args.size, args.size), generator=gen).to(device)
    name = device.type if device.type != "cuda" else torch.cuda.get_device_name(device)
    print(f"device {name}, threads {torch.get_num_threads()}, {args.size}x{args.size}, "
          f"ensemble {args.ensemble}, t={args.t}, output block {args.block}, torch "
          f"{torch.__version__}", flush=True)
    rows = []
    ref = None
    if not args.skip_legacy:
        with torch.no_grad():
            ref, ms, cpu_s, mem = measure(
                lambda: legacy_dift_features(model, image, args.t, args.block, noise),
                device, repeats, warmup)
        rows.append(("legacy (fp32, einsum attention, all skips, full net)", ms, cpu_s, mem))
        emit({"variant": rows[-1][0], "stage": "result", "ms_per_image": ms,
              "cpu_s_per_image": cpu_s, "peak_mem_gib": mem})

    model.set_compute_dtype(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    compiler = Compiler("the ADM UNet (benchmark)", args.compile_mode)
    if compile_:
        setup_compile_cache()
        compiler.method(model, "features")

    def ours_fn() -> torch.Tensor:
        return compiler.run(lambda: adm_dift_features(model, image, args.t, args.block, noise,
                                                      args.chunk, channels_last))

    t0 = time.perf_counter()
    ours_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    emit({"variant": "ours", "stage": "first_call", "first_call_s": first_s,
          "compiled": compiler.active})
    ours, ms, cpu_s, mem = measure(ours_fn, device, repeats, warmup)
    label = (f"ours ({str(dtype).split('.')[-1]}, SDPA, early exit, dropped skips"
             + (f", chunk {args.chunk}" if args.chunk else "")
             + (", channels_last" if channels_last else "")
             + (", compile" if compiler.active else "") + ")")
    rows.append((label, ms, cpu_s, mem))
    compile_s = max(0.0, first_s - ms / 1000)
    emit({"variant": label, "stage": "result", "ms_per_image": ms, "cpu_s_per_image": cpu_s,
          "peak_mem_gib": mem, "first_call_s": first_s, "steady_call_s": ms / 1000,
          "compile_s": compile_s})

    unit = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS"
    print(f"| variant | ms/image | process CPU s/image | peak memory above weights (GiB, "
          f"{unit}) |")
    print("|---|---:|---:|---:|")
    for label, ms, cpu_s, mem in rows:
        print(f"| {label} | {ms:.0f} | {cpu_s:.1f} | {mem:.2f} |")
    print(f"features {tuple(ours.shape)}, finite: {bool(torch.isfinite(ours).all())}")
    if ref is not None:
        diff = (ours - ref).abs().max().item()
        rel = ((ours - ref).norm() / ref.norm()).item()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        verdict = "same features" if rel < tol else "MISMATCH"
        print(f"ours vs legacy: max abs diff {diff:.2e}, relative L2 {rel:.2e} "
              f"(max |ref| {ref.abs().max().item():.2f}) -> {verdict}")
    print(f"first call of ours {first_s:.1f} s = compile ~{compile_s:.1f} s + steady call "
          f"{ms / 1000:.3f} s")
    print(json.dumps({"device": name, "size": args.size, "ensemble": args.ensemble,
                      "first_call_s": first_s, "compile_s": compile_s,
                      "rows": [{"variant": r[0], "ms_per_image": r[1], "cpu_s_per_image": r[2],
                                "peak_mem_gib": r[3]} for r in rows]}))


if __name__ == "__main__":
    main()
