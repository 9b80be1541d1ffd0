#!/usr/bin/env bash
# One command for every GPU figure of dift-sfm: featurizer benchmarks (public algorithm vs ours,
# DIFT-SD and DIFT-ADM, random weights of the real architectures), end-to-end `dift-sfm extract`
# rates on a folder of photos (random-weight models written here), and the matching rate.
# Prints one summary table at the end; every step's raw output is kept in $OUT.
#
#   bash benchmarks/run_gpu.sh                 # CUDA machine, from the repo root (< 8 min, H100)
#   IMAGE_DIR=/photos bash benchmarks/run_gpu.sh
#   bash benchmarks/run_gpu.sh --smoke         # same code paths on the CPU, tiny models (< 2 min)
#
# Environment: OUT (default ./gpu_out), IMAGE_DIR (default: photos from ../shared/data, else
# synthetic ones), BUDGET_S (total seconds, default 520), PYTHON, WORK (scratch folder for the
# random models; default a temporary folder outside $OUT), SMOKE=1 (= --smoke).
set -u
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        *) IMAGE_DIR=$arg ;;
    esac
done
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/dift_gpu.XXXXXX")}
mkdir -p "$WORK"
BUDGET_S=${BUDGET_S:-520}
START=$(date +%s)
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python || command -v python3); fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DIFT_SFM_CACHE=${DIFT_SFM_CACHE:-$HOME/.cache/dift_sfm}  # holds the torch.compile cache
export HF_HUB_OFFLINE=1
: > "$OUT/steps.tsv"

# step NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S, budget left), log to $OUT/NAME.log
step() {
    local name=$1 cap=$2; shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
        echo "== $name: skipped (time budget spent)"
        return 0
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$? t=$(($(date +%s) - t0))
    local status=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timeout"
    [ $rc -ne 0 ] && [ "$status" = ok ] && status="failed(rc=$rc)"
    printf '%s\t%s\t%s\n' "$name" "$status" "$t" >> "$OUT/steps.tsv"
    echo "   -> $status in ${t}s"
    [ "$status" = ok ] || tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
    return 0
}

# ------------------------------------------------------------------ setup
if [ -d wheels ] && ls wheels/*.whl > /dev/null 2>&1; then
    # --no-deps: the machine has the rest (torch, transformers, huggingface_hub, ...)
    step pip_wheels 120 "$PYTHON" -m pip install -q --no-deps wheels/*.whl
fi
if ! "$PYTHON" -c "import dift_sfm.cli" > /dev/null 2>&1 || [ "$SMOKE" != 1 ]; then
    step pip_editable 60 "$PYTHON" -m pip install -e . --no-deps --no-build-isolation -q
fi
step env 30 "$PYTHON" -c "
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
"
if [ "$SMOKE" = 1 ]; then
    DEV=cpu
    SD_BENCH=(--arch tiny --device cpu --size 64 --ensemble 2 --warmup 1 --repeats 2 --isolated)
    ADM_BENCH=(--arch tiny --device cpu --size 64 --ensemble 2 --warmup 0 --repeats 1)
    ARCH_SD=tiny; ARCH_ADM=tiny; N_IMAGES=6
    SD_SET=(--max-keypoints 256 --set 'featurizer.img_size=[64,64]' --set featurizer.ensemble=2)
    ADM_SET=(--max-keypoints 256 --set 'featurizer.img_size=[64,64]' --set featurizer.ensemble=2
             --set featurizer.output_block=7)
    MATCH_ARGS=(--device cpu)
else
    DEV=cuda
    SD_BENCH=(--device cuda --size 768 --ensemble 8 --warmup 2 --repeats 10)
    ADM_BENCH=(--device cuda --size 768 --ensemble 4 --warmup 2 --repeats 5)
    ARCH_SD=sd21; ARCH_ADM=adm256; N_IMAGES=32
    SD_SET=(); ADM_SET=()
    MATCH_ARGS=(--device cuda)
fi

# ------------------------------------------------------------------ matching, featurizers
# (most important first: a step that no longer fits the budget is skipped). bench_sd prints
# each variant's JSON line as soon as it is measured, so a timeout keeps the finished ones;
# batch 4 is a later step of its own (no public run: the summary takes public from b1), and
# shares the compiled graphs of batch 1 through the compile cache (dynamic batch dim).
step bench_match "${MATCH_CAP:-90}" "$PYTHON" benchmarks/bench_match_gpu.py "${MATCH_ARGS[@]}"
step bench_sd_b1 "${SD_B1_CAP:-170}" "$PYTHON" benchmarks/bench_sd.py "${SD_BENCH[@]}" --batch 1

# ------------------------------------------------------------------ photos + random models
IMAGES="$WORK/images"
mkdir -p "$IMAGES"
step images 30 "$PYTHON" - "$IMAGES" "$N_IMAGES" "${IMAGE_DIR:-}" <<'EOF'
"""Copy up to N photos into one flat folder (IMAGE_DIR, else ../shared/data), else synthesise."""
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

out, n, given = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
exts = {".jpg", ".jpeg", ".png", ".ppm", ".bmp"}
shared = Path("..") / "shared" / "data"
roots = [Path(given)] if given else [shared / d for d in
                                     ("sacre_coeur", "hpatches/v_graffiti", "oxford_affine",
                                      "lightglue_assets", "scannet_sample")]
found = [p for r in roots if r.is_dir() for p in sorted(r.rglob("*")) if p.suffix.lower() in exts]
for i, p in enumerate(found[:n]):
    shutil.copy(p, out / f"{i:03d}_{p.parent.name}_{p.name}")
rng = np.random.default_rng(0)
for i in range(len(found[:n]), n):  # photo-like synthetic images: smooth noise + shapes
    h, w = 768, 1024
    img = sum(cv2.resize(rng.random((h // s, w // s, 3)).astype(np.float32), (w, h),
                         interpolation=cv2.INTER_CUBIC) / k for k, s in enumerate((64, 16, 4), 1))
    img = (255 * (img - img.min()) / (img.max() - img.min())).astype(np.uint8)
    for _ in range(60):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(img, tuple(int(v) for v in rng.integers(0, (w, h))), int(rng.integers(5, 80)), c, -1)
    cv2.imwrite(str(out / f"{i:03d}_synthetic.jpg"), img)
print(f"{len(found[:n])} photos from {[str(r) for r in roots]}, {max(0, n - len(found))} synthetic")
EOF
step write_sd_model 120 "$PYTHON" benchmarks/bench_sd.py --write-model "$WORK/sd-random" --arch "$ARCH_SD" --device "$DEV"

# ------------------------------------------------------------------ end to end
# `dift-sfm ARGS` in-process, timing each featurizer call: one JSON line with the rates.
cat > "$WORK/timed_cli.py" <<'EOF'
"""Run `dift-sfm ARGS`; print a JSON line: wall time, time to the first featurizer result,
images described, the steady rate after the first call, pairs matched (for `match`)."""
import json
import sys
import time

t0 = time.perf_counter()
from dift_sfm.featurizers import base  # noqa: E402

marks: list[tuple[float, int]] = []
for cls in (base.Featurizer, base.DenseFeaturizer):
    def wrap(fn):
        def describe_batch(self, images, keypoints):
            out = fn(self, images, keypoints)
            marks.append((time.perf_counter(), len(images)))
            return out
        return describe_batch
    cls.describe_batch = wrap(cls.__dict__["describe_batch"])
from dift_sfm.cli import main  # noqa: E402

rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
info = {"argv": sys.argv[1:], "rc": rc, "wall_s": wall}
if marks:
    n = sum(k for _, k in marks)
    info.update(images=n, first_result_s=marks[0][0] - t0, overall_img_per_s=n / wall)
    if len(marks) > 1:
        info["steady_img_per_s"] = (n - marks[0][1]) / (marks[-1][0] - marks[0][0])
if sys.argv[1] == "match":
    pairs = sum(1 for line in open(sys.argv[2]) if line.strip())
    info.update(pairs=pairs, pairs_per_s=pairs / wall)
print(json.dumps(info))
sys.exit(rc)
EOF
SD_MODEL_ARGS=(--model "$WORK/sd-random" --set "featurizer.prompt_embeds=$WORK/sd-random/prompt_embeds.safetensors")
step extract_sd 90 "$PYTHON" "$WORK/timed_cli.py" extract "$IMAGES" -o "$WORK/feats-sd.h5" --conf dift-sd \
    --device "$DEV" "${SD_MODEL_ARGS[@]}" "${SD_SET[@]}" --overwrite
step bench_adm 120 "$PYTHON" benchmarks/bench_adm.py "${ADM_BENCH[@]}"
step write_adm_model 90 "$PYTHON" benchmarks/bench_adm.py --write-model "$WORK/adm-random/adm_weights.safetensors" --arch "$ARCH_ADM" --device "$DEV"
step extract_adm 90 "$PYTHON" "$WORK/timed_cli.py" extract "$IMAGES" -o "$WORK/feats-adm.h5" --conf dift-adm \
    --device "$DEV" --model "$WORK/adm-random/adm_weights.safetensors" "${ADM_SET[@]}" --overwrite
step bench_sd_b4 "${SD_B4_CAP:-100}" "$PYTHON" benchmarks/bench_sd.py "${SD_BENCH[@]}" --batch 4 --no-public
step extract_sd_b4 60 "$PYTHON" "$WORK/timed_cli.py" extract "$IMAGES" -o "$WORK/feats-sd-b4.h5" --conf dift-sd \
    --device "$DEV" "${SD_MODEL_ARGS[@]}" "${SD_SET[@]}" --set featurizer.batch_size=4 --overwrite

# ------------------------------------------------------------------ matching
step pairs 30 "$PYTHON" "$WORK/timed_cli.py" pairs exhaustive "$IMAGES" -o "$WORK/pairs.txt"
step match_sd 60 "$PYTHON" "$WORK/timed_cli.py" match "$WORK/pairs.txt" --features "$WORK/feats-sd.h5" \
    -o "$WORK/matches-sd.h5" --device "$DEV" --overwrite
step pipeline 45 "$PYTHON" benchmarks/bench_pipeline.py "$IMAGES" --featurizer-ms "${PIPELINE_MS:-60}" --repeat 4

# ------------------------------------------------------------------ summary
"$PYTHON" - "$OUT" "$(( $(date +%s) - START ))" "$SMOKE" <<'EOF' | tee "$OUT/summary.md"
"""One table from the steps' logs (their last JSON lines) and steps.tsv."""
import json
import sys
from pathlib import Path

out, total, smoke = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines() if line]


def json_lines(name: str) -> list[dict]:
    """Every JSON object line of the step's log, in order."""
    path = out / f"{name}.log"
    found = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def last_json(name: str):
    lines = json_lines(name)
    return lines[-1] if lines else None


def variant_records(*names: str) -> tuple[dict[str, dict], dict[str, float]]:
    """{variant: result} from the per-variant lines (stage result / first_call) and the final
    JSON of benchmark logs; {variant: first call s} of variants that never finished."""
    results, first = {}, {}
    for name in names:
        for rec in json_lines(name):
            if "results" in rec:
                results.update(rec["results"])
            elif rec.get("stage") == "result":
                results[rec["variant"]] = rec
            elif rec.get("stage") == "first_call":
                first[rec["variant"]] = rec["first_call_s"]
    return results, {v: s for v, s in first.items() if not any(k.startswith(v) for k in results)}


def compile_note(r: dict) -> str:
    note = f"first call {r.get('first_call_s', 0):.1f} s"
    return note + (f" (compile ~{r['compile_s']:.1f} s)" if "compile_s" in r else "")


rows = []
sd, sd_first = variant_records("bench_sd_b1", "bench_sd_b4")
pub = sd.get("public", {}).get("ms_per_image")
for v, r in sd.items():
    target = {"ours": ">= 8x, <= 4 GiB", "ours-b4": ">= 10x"}.get(v, "")
    speed = f"{pub / r['ms_per_image']:.2f}x, " if pub else "no public run, "
    rows.append((f"DIFT-SD featurizer: {v}", f"{r['ms_per_image']:.1f} ms/img",
                 f"{speed}{r['peak_mem_bytes'] / 2**30:.2f} GiB, {compile_note(r)}", target))
for v, first_s in sd_first.items():
    rows.append((f"DIFT-SD featurizer: {v}", "not finished",
                 f"first call (compile) {first_s:.1f} s, then the step ended", ""))
adm, adm_first = variant_records("bench_adm")
for label, r in adm.items():
    target = "<= 150 ms, <= 8 GiB" if label.startswith("ours") else ""
    rows.append((f"DIFT-ADM featurizer: {label[:40]}", f"{r['ms_per_image']:.1f} ms/img",
                 f"{r['peak_mem_gib']:.2f} GiB" + (f", {compile_note(r)}" if "first_call_s" in r
                                                   else ""), target))
for label, first_s in adm_first.items():
    rows.append((f"DIFT-ADM featurizer: {label}", "not finished",
                 f"first call (compile) {first_s:.1f} s, then the step ended", ""))
for name in ("extract_sd", "extract_sd_b4", "extract_adm"):
    r = last_json(name)
    if r and "images" in r:
        rows.append((f"dift-sfm {name.replace('_', ' ')}", f"{r.get('steady_img_per_s', 0):.2f} img/s steady",
                     f"{r['images']} images in {r['wall_s']:.1f} s ({r['overall_img_per_s']:.2f} img/s "
                     f"overall), first result after {r['first_result_s']:.1f} s", ""))
r = last_json("match_sd")
if r and "pairs" in r:
    rows.append(("dift-sfm match (SD features)", f"{r['pairs_per_s']:.1f} pairs/s",
                 f"{r['pairs']} pairs in {r['wall_s']:.1f} s incl. start-up", ">= 2000 pairs/s"))
bench = last_json("bench_match")
for r in (bench or {}).get("rows", []):
    details = ", ".join(f"{k} {v}" for k, v in r.items()
                        if k not in ("batched_pairs_per_s", "conf", "D", "keypoints"))
    rows.append((f"matching, {r.get('conf', '')} {r.get('keypoints')} x {r.get('D')}-D",
                 f"{r.get('batched_pairs_per_s')} pairs/s batched", details,
                 ">= 2000 pairs/s" if "cuda" in str(bench.get("device", "")).lower() or
                 r.get("D", 0) >= 512 else "pair <= 1.5x product"))
pipe = last_json("pipeline")
if pipe:
    rows.append((f"pipelined extract, stand-in featurizer {pipe['featurizer_ms']} ms",
                 f"{pipe['pipeline_img_per_s']} img/s", f"{pipe['ratio']:.2f} of the stand-in's "
                 f"{pipe['featurizer_img_per_s']} img/s, {pipe['workers']} workers", ">= 0.9"))
print(f"\n# dift-sfm GPU benchmark summary ({'SMOKE, CPU, tiny models' if smoke else 'CUDA'}), "
      f"{total} s\n")
print("| measurement | value | details | target |\n|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
failed = [(n, s) for n, s, _ in steps if s != "ok"]
print("\nsteps: " + ", ".join(f"{n} {s} ({t} s)" for n, s, t in steps))
print("FAILED/SKIPPED: " + (", ".join(f"{n} ({s})" for n, s in failed) if failed else "none"))
EOF
