"""Benchmark DIFT-SD: the public DIFT algorithm against dift-sfm's, on the real SD-2.1 architecture.

The SD-2.1 (768-v) UNet and VAE are built from the configs below with random weights (nothing is
downloaded), so the cost is that of the real model. Each variant runs in its own process (same
seed, hence the same weights and the same random draws), so peak memory is measured cleanly;
the timing then runs all variants interleaved in one process:

- ``public``: DIFT as published: fp32, the E ensemble copies of the image each VAE-encoded, the
  posterior sampled per copy, then the UNet on the E noisy latents with the up-block captured by
  a hook while the FULL UNet runs (``--public-early-exit``: stop after the block, as the public
  code's own forward does);
- ``ours``: ``dift_sfm.featurizers.sd.sd_dift_features``: one VAE encoding, E posterior samples,
  early exit after ``up_blocks[i]``, ``--dtype`` (auto: bf16 on CUDA), channels_last on CUDA,
  ``--compile`` (auto: on CUDA, as the featurizer: ``compile_sd`` with the eager fallback),
  ``--chunk`` UNet samples per call; ``--batch 1 4`` adds ``ours-b4`` (4 images per call).

On CUDA every variant is measured (memory and time) in its own process (``--isolated``, the
default there); on CPU the timing runs all variants interleaved in one process instead.
Variants run in the order public, ours, ours-b4 (cheapest and most important first); each
prints a JSON line ``{"variant": ..., "stage": ...}`` as soon as it is measured (``first_call``:
the first call's time, compile included; ``result``: the full result, with ``first_call_s``,
``steady_call_s`` and ``compile_s`` = their difference), so a run cut short keeps the finished
variants. ``--no-public`` skips the public variant (e.g. a second run for ``--batch 4``).
``--arch tiny`` swaps in a small SD-like model (for smoke tests); ``--write-model DIR`` saves the
random model as a diffusers folder (+ ``prompt_embeds.safetensors``) and exits.

Both get the same ``vae_eps`` and ``noise`` tensors, and the script reports how far their
features are apart. Reported: ms/image (best of ``--repeats`` after ``--warmup`` runs: on a
shared machine other load only ever adds time; the mean is in the JSON), peak
memory (CUDA: ``max_memory_allocated``; CPU: peak RSS increase during the runs, sampled every
5 ms, over the process with the models loaded), process CPU time per image (all threads; less
sensitive than wall time to other load on a shared machine) and FLOP/s from a FLOP count
(matmuls, convs and attention, counted once on the meta device; 1 multiply-add = 2 FLOP).

    python benchmarks/bench_sd.py                       # CPU: 256x256, ensemble 2
    python benchmarks/bench_sd.py --device cuda --size 768 --ensemble 8 --repeats 10 --batch 1 4
    python benchmarks/bench_sd.py --write-model /tmp/sd21-random     # for `dift-sfm extract`
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dift_sfm.featurizers.sd import (  # noqa: E402
    compile_sd,
    sd_dift_features,
    unet_up_block_output,
)
from dift_sfm.runtime import (  # noqa: E402
    Compiler,
    resolve_device,
    resolve_dtype,
    resolve_flag,
    setup_compile_cache,  # noqa: E402
)

# Stable Diffusion 2.1 (768-v): the UNet and VAE configs of the released model.
SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True,
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=768,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
    scaling_factor=0.18215,
)
# A small SD-like model (same block types) for smoke tests: 64x64 inputs, seconds on a CPU.
TINY_UNET = dict(SD21_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64),
                 attention_head_dim=(2, 4, 4, 4), cross_attention_dim=32, layers_per_block=1)
TINY_VAE = dict(SD21_VAE, sample_size=64, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
ARCHS = {"sd21": (SD21_UNET, SD21_VAE), "tiny": (TINY_UNET, TINY_VAE)}
SD21_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                     steps_offset=1, prediction_type="v_prediction")


def build(device: torch.device | str, seed: int = 0, arch: str = "sd21",
          keep_decoder: bool = False):
    """SD-2.1 UNet + VAE (decoder dropped) with seeded random weights, and its DDIM schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet_conf, vae_conf = ARCHS[arch]
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_conf)
        vae = AutoencoderKL(**vae_conf)
    if not keep_decoder:
        vae.decoder = vae.post_quant_conv = None
    return unet.eval().requires_grad_(False), vae.eval().requires_grad_(False), \
        DDIMScheduler(**SD21_SCHEDULE)


def write_model(folder: str | Path, arch: str = "sd21", seed: int = 0,
                device: str = "auto") -> Path:
    """Save the random model as a diffusers folder (fp16 weights, unet/ vae/ scheduler/) plus
    ``prompt_embeds.safetensors`` (a random (1, 77, C) embedding: no text encoder needed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    unet, vae, scheduler = build(resolve_device(device), seed, arch, keep_decoder=True)
    unet.to(torch.float16).save_pretrained(folder / "unet")
    vae.to(torch.float16).save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    emb = torch.randn(1, 77, unet.config.cross_attention_dim,
                      generator=torch.Generator().manual_seed(seed))
    save_file({"prompt_embeds": emb}, str(folder / "prompt_embeds.safetensors"))
    return folder


def inputs(args, device="cpu"):
    """The image, prompt embedding and random draws every variant shares (seeded, on CPU)."""
    gen = torch.Generator().manual_seed(args.seed)
    h, w = args.size
    image = torch.rand(1, 3, h, w, generator=gen) * 2 - 1
    emb = torch.randn(1, 77, ARCHS[args.arch][0]["cross_attention_dim"], generator=gen)
    shape = (args.ensemble, 4, h // 8, w // 8)
    eps, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return [x.to(device) for x in (image, emb, eps, noise)]


@torch.no_grad()
def public_dift(unet, vae, scheduler, image, emb, t, up_ft_index, eps, noise,
                early_exit=False):
    """DIFT as published (our re-implementation): every ensemble copy is VAE-encoded."""
    e = eps.shape[0]
    copies = image.repeat(e, 1, 1, 1)
    post = vae.encode(copies).latent_dist  # E encodings of the same image
    latents = (post.mean + post.std * eps) * vae.config.scaling_factor
    timesteps = torch.full((e,), t, dtype=torch.long, device=image.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    feats = unet_up_block_output(unet, noisy, timesteps, emb.repeat(e, 1, 1), up_ft_index,
                                 early_exit=early_exit)
    return feats.mean(0, keepdim=True)


def batch_of(variant: str) -> int:
    """Images per call of a variant: ``ours`` 1, ``ours-b4`` 4, ``public*`` 1."""
    return int(variant.split("-b")[1]) if variant.startswith("ours-b") else 1


def make_variants(variants: list[str], args, device: torch.device, dtype: torch.dtype):
    """{variant: callable computing the features of one image}, sharing one set of weights.

    ``public*`` run the fp32 models; ``ours*`` run one copy in ``dtype`` (channels_last and
    torch.compile as the featurizer's defaults), or the same modules when that changes nothing
    (fp32 on CPU, no compile). ``ours-bN`` computes N images per call (the first is returned).
    """
    unet32, vae32, scheduler = build(device, args.seed, args.arch)
    image, emb, eps, noise = inputs(args, device)
    fns = {}
    for v in variants:
        if v.startswith("public"):
            fns[v] = functools.partial(public_dift, unet32, vae32, scheduler, image, emb, args.t,
                                       args.up_ft_index, eps, noise,
                                       early_exit=v == "public-early-exit")
    ours = [v for v in variants if v.startswith("ours")]
    if ours:
        channels_last = resolve_flag(args.channels_last, device)
        compile_ = resolve_flag(args.compile, device)
        same = dtype == torch.float32 and not channels_last and not compile_
        public = any(v.startswith("public") for v in variants)
        unet_o = copy.deepcopy(unet32) if public and not same else unet32
        vae_o = copy.deepcopy(vae32) if public and not same else vae32
        # nn.Module.to: diffusers' ModelMixin.to warns about an empty fp32-module list on casts
        torch.nn.Module.to(unet_o, dtype=dtype)
        torch.nn.Module.to(vae_o, dtype=dtype)
        if channels_last:
            unet_o.to(memory_format=torch.channels_last)
            vae_o.to(memory_format=torch.channels_last)
        compiler = Compiler("the SD blocks (benchmark)", args.compile_mode,
                            dynamic_batch=args.compile_dynamic_batch)
        if compile_:
            setup_compile_cache()
            compile_sd(unet_o, vae_o, args.up_ft_index, compiler)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        for v in ours:
            images = image.repeat(batch_of(v), 1, 1, 1)
            chunk = args.chunk or args.ensemble * batch_of(v)
            fns[v] = functools.partial(
                lambda images, chunk: compiler.run(lambda: sd_dift_features(
                    unet_o, vae_o, scheduler, images, emb, args.t, args.up_ft_index, eps, noise,
                    0.18215, chunk_size=chunk)[:1]), images, chunk)
    return fns


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def emit(record: dict) -> None:
    """Print ``record`` as one JSON line, flushed (the log keeps it even if the run is killed)."""
    print(json.dumps(record), flush=True)


def child(args) -> None:
    """One variant in a fresh process: peak memory of one run (after a warm-up) + features;
    with ``--isolated`` also its timing. Prints a ``first_call`` JSON line once compiled."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t_build = time.perf_counter()
    fn = make_variants([args.variant], args, device, dtype)[args.variant]
    build_s = time.perf_counter() - t_build
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first_s = time.perf_counter() - t0
    emit({"variant": args.variant, "stage": "first_call", "first_call_s": first_s,
          "build_s": build_s})
    base, peak, stop = _rss(), [0], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    feats = fn()
    _sync(device)
    stop.set()
    thread.join()
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else max(peak[0], _rss()) - base)
    result = {"peak_mem_bytes": int(mem), "first_call_s": first_s, "build_s": build_s}
    if args.isolated:
        result.update(time_variants([args.variant], args, {args.variant: fn})[args.variant])
    Path(args.out_json).write_text(json.dumps(result))
    torch.save(feats.float().cpu(), args.out_features)


def time_variants(variants: list[str], args, fns: dict | None = None) -> dict[str, dict]:
    """Wall and CPU time per image, the variants interleaved round-robin in one process so
    that other load on a shared machine hits them alike; best of ``repeats`` (and the mean)."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    fns = fns or make_variants(variants, args, device, dtype)
    for _ in range(args.warmup):
        for v in variants:
            fns[v]()
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[v]()
            _sync(device)
            per = batch_of(v)
            times[v].append((time.perf_counter() - t0) / per)
            cpu[v].append((time.process_time() - c0) / per)
    return {v: {"device": str(device),
                "dtype": str(dtype)[6:] if v.startswith("ours") else "float32",
                "ms_per_image": 1000 * min(times[v]),
                "mean_ms_per_image": 1000 * sum(times[v]) / len(times[v]),
                "cpu_s_per_image": min(cpu[v]), "times_s": times[v],
                "threads": torch.get_num_threads()} for v in variants}


def count_flops(args) -> dict[str, float]:
    """FLOPs per image of each variant, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae, scheduler = build("meta", args.seed, args.arch)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to("meta")
    image, emb, eps, noise = inputs(args, "meta")
    out = {}
    for variant in ("public", "public-early-exit", "ours"):
        with FlopCounterMode(display=False) as counter:
            if variant == "ours":
                sd_dift_features(unet, vae, scheduler, image, emb, args.t, args.up_ft_index, eps,
                                 noise, 0.18215)
            else:
                public_dift(unet, vae, scheduler, image, emb, args.t, args.up_ft_index, eps,
                            noise, early_exit=variant == "public-early-exit")
        out[variant] = float(counter.get_total_flops())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs="+", default=None,
                   help="input H [W] (multiples of 64); default 256 on CPU, 768 on GPU")
    p.add_argument("--ensemble", type=int, default=None, help="default 2 on CPU, 8 on GPU")
    p.add_argument("--t", type=int, default=0)
    p.add_argument("--up-ft-index", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="ours only (public is fp32)")
    p.add_argument("--chunk", type=int, default=None,
                   help="ours: UNet samples per call (default: ensemble x batch)")
    p.add_argument("--batch", type=int, nargs="+", default=[1],
                   help="ours: images per call; several values give ours, ours-b4, ...")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="ours: torch.compile the blocks (auto: on CUDA)")
    p.add_argument("--compile-mode", default=None, help="ours: torch.compile mode")
    p.add_argument("--compile-dynamic-batch", action=argparse.BooleanOptionalAction,
                   default=False, help="ours: one compiled graph for every batch size "
                   "(default: static shapes, as the featurizer's default)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--arch", default="sd21", choices=sorted(ARCHS))
    p.add_argument("--isolated", action=argparse.BooleanOptionalAction, default=None,
                   help="time each variant in its own process (default: on CUDA)")
    p.add_argument("--write-model", metavar="DIR",
                   help="save the random model as a diffusers folder and exit")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--public-early-exit", action="store_true",
                   help="also time the public algorithm stopping after the block")
    p.add_argument("--no-public", dest="public", action="store_false",
                   help="skip the public variant (speed-ups then come from another run)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    p.add_argument("--out-features", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_model:
        print(write_model(args.write_model, args.arch, args.seed, args.device))
        return 0
    gpu = resolve_device(args.device).type == "cuda"
    size = args.size or [768 if gpu else 256]
    args.size = (size[0], size[-1])
    args.ensemble = args.ensemble or (8 if gpu else 2)
    args.isolated = gpu if args.isolated is None else args.isolated
    if args.variant:
        child(args)
        return 0

    flops = count_flops(args)
    variants = [*(["public"] if args.public else []),
                *(["public-early-exit"] if args.public_early_exit else []),
                *("ours" if b == 1 else f"ours-b{b}" for b in args.batch)]
    h, w = args.size
    mode = "each in its own process" if args.isolated else "timed in one process"
    print(f"DIFT-SD, SD-2.1 architecture ({args.arch}, random weights), {w}x{h}, ensemble "
          f"{args.ensemble}, t={args.t}, up_blocks[{args.up_ft_index}]; variants "
          f"{', '.join(variants)} ({mode})", flush=True)
    results, feats = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            cmd = [sys.executable, __file__, "--variant", v,
                   "--out-json", f"{tmp}/{v}.json", "--out-features", f"{tmp}/{v}.pt",
                   "--size", *map(str, args.size), "--ensemble", str(args.ensemble),
                   "--t", str(args.t), "--up-ft-index", str(args.up_ft_index),
                   "--device", args.device, "--dtype", args.dtype,
                   *(["--chunk", str(args.chunk)] if args.chunk else []),
                   "--seed", str(args.seed), "--compile", args.compile,
                   *(["--compile-mode", args.compile_mode] if args.compile_mode else []),
                   "--compile-dynamic-batch" if args.compile_dynamic_batch
                   else "--no-compile-dynamic-batch",
                   "--channels-last", args.channels_last, "--arch", args.arch,
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                   "--isolated" if args.isolated else "--no-isolated"]
            subprocess.run(cmd, check=True)
            results[v] = json.loads(Path(f"{tmp}/{v}.json").read_text())
            feats[v] = torch.load(f"{tmp}/{v}.pt")
            if args.isolated:
                report(v, results, feats, flops)
    if not args.isolated:
        for v, timing in time_variants(variants, args).items():
            results[v].update(timing)
            report(v, results, feats, flops)

    ref = feats[variants[0]]
    print(f"features {tuple(ref.shape)}; speed-up and differences against "
          f"{'public' if 'public' in results else variants[0] + ' (no public variant)'}")
    print(f"{'variant':18s} {'device':7s} {'dtype':9s} {'ms/img':>9s} {'CPU s/img':>9s} "
          f"{'peak mem':>10s} {'GFLOP/img':>10s} {'TFLOP/s':>8s} {'speed-up':>8s} "
          f"{'max|diff|/max|ref|':>18s} {'1st call':>8s} {'compile':>8s}")
    base_ms = results[variants[0]]["ms_per_image"]
    for v in variants:
        r = results[v]
        flop = flops["ours" if v.startswith("ours") else v]
        diff = ((feats[v] - ref).abs().max() / ref.abs().max()).item()
        print(f"{v:18s} {r['device']:7s} {r['dtype']:9s} {r['ms_per_image']:9.1f} "
              f"{r['cpu_s_per_image']:9.2f} "
              f"{r['peak_mem_bytes'] / 2**30:8.2f}Gi {flop / 1e9:10.1f} "
              f"{flop / (r['ms_per_image'] / 1000) / 1e12:8.3f} "
              f"{base_ms / r['ms_per_image']:7.2f}x {diff:18.2e} {r['first_call_s']:7.1f}s "
              f"{r['compile_s']:7.1f}s")
    for v in variants[1:]:
        cos = torch.nn.functional.cosine_similarity(feats[v].flatten(1), ref.flatten(1)).item()
        print(f"{v} vs {variants[0]}: cosine similarity {cos:.6f}")
    print(json.dumps({"args": {k: v for k, v in vars(args).items() if not k.startswith("out")},
                      "results": results, "flops": flops}), flush=True)
    return 0


def report(v: str, results: dict[str, dict], feats: dict[str, torch.Tensor],
           flops: dict[str, float]) -> None:
    """Complete ``results[v]`` (steady call time, compile time, speed-up and difference against
    public when measured) and print it at once: a readable line and a ``result`` JSON line."""
    r = results[v]
    r["steady_call_s"] = r["ms_per_image"] * batch_of(v) / 1000
    r["compile_s"] = max(0.0, r["first_call_s"] - r["steady_call_s"])
    r["gflop_per_image"] = flops["ours" if v.startswith("ours") else v] / 1e9
    line = (f"-> {v}: {r['ms_per_image']:.1f} ms/img (mean {r['mean_ms_per_image']:.1f}), peak "
            f"{r['peak_mem_bytes'] / 2**30:.2f} GiB, first call {r['first_call_s']:.1f} s = "
            f"compile ~{r['compile_s']:.1f} s + steady call {r['steady_call_s']:.3f} s")
    if "public" in results and v != "public":
        pub, ref = results["public"], feats["public"]
        r["speedup_vs_public"] = pub["ms_per_image"] / r["ms_per_image"]
        r["max_rel_diff_vs_public"] = ((feats[v] - ref).abs().max() / ref.abs().max()).item()
        line += (f", {r['speedup_vs_public']:.2f}x public, max|diff|/max|ref| "
                 f"{r['max_rel_diff_vs_public']:.2e}")
    print(line, flush=True)
    emit({"variant": v, "stage": "result", **r})

if __name__ == "__main__":
    sys.exit(main())
