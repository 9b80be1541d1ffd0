#!/usr/bin/env bash
# One command for every GPU figure of dift-sfm: the matching rate (wall, steady state, kernel
# ceiling), featurizer benchmarks (public algorithm vs ours, DIFT-SD and DIFT-ADM, random
# weights of the real architectures), end-to-end `dift-sfm extract` rates on a folder of photos
# (random-weight models written here). Prints one summary table at the end.
#
#   bash benchmarks/run_gpu.sh                 # CUDA machine, from the repo root (< 8 min, H100)
#   IMAGE_DIR=/photos bash benchmarks/run_gpu.sh
#   bash benchmarks/run_gpu.sh --smoke         # same code paths on the CPU, tiny models
#
# $OUT receives three files only (a device machine hands back few files): steps.tsv (name,
# status, seconds, limit), summary.md (rewritten after every step, so it exists even if the
# run is killed) and logs.txt (every step's output, the last 400 KB of each). The per-step logs
# are in $LOGS. On SIGTERM/SIGINT the running step is stopped and the summary still printed.
#
# Time: every step runs under min(its cap, what is left of BUDGET_S minus 15 s), the 15 s
# being timeout's 10 s kill grace plus the summary, so the script ends within BUDGET_S.
# Steps run most important first (matching, SD featurizer, SD extract, ADM, ...): one that no
# longer fits is skipped. All processes share one compile cache (DIFT_SFM_CACHE, and
# TORCHINDUCTOR_CACHE_DIR below it), so a later step compiles warm what an earlier compiled.
#
# Environment: OUT (default ./gpu_out), IMAGE_DIR (default: photos from ../shared/data, else
# synthetic ones), IMAGE_DIR_12MP (12 MP JPEGs; default ../shared/data/photos_12mp, else one
# synthetic 4032x3024 JPEG, copied to 48 names), BUDGET_S (total seconds, default 470: with a machine's start, 8 minutes),
# PYTHON, WORK (scratch folder for the random models; default a temporary folder outside
# $OUT), LOGS (default $WORK/logs), DIFT_SFM_CACHE, SMOKE=1 (= --smoke); caps MATCH_CAP,
# SD_B1_CAP, SD_B4_CAP.
set -u
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        *) IMAGE_DIR=$arg ;;
    esac
done
START=$(date +%s)
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/dift_gpu.XXXXXX")}
mkdir -p "$WORK"
LOGS=${LOGS:-$WORK/logs}
mkdir -p "$LOGS"
BUDGET_S=${BUDGET_S:-470}
GRACE_S=15  # timeout's --kill-after (10 s) + the summary
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python || command -v python3); fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# one compile cache for every step (bench_sd's isolated variants, extract, bench_adm, ...)
export DIFT_SFM_CACHE=${DIFT_SFM_CACHE:-$HOME/.cache/dift_sfm}
mkdir -p "$DIFT_SFM_CACHE" 2> /dev/null || export DIFT_SFM_CACHE="$WORK/cache"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$DIFT_SFM_CACHE/torch_compile}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
export HF_HUB_OFFLINE=1
: > "$OUT/steps.tsv"
: > "$OUT/logs.txt"

# ------------------------------------------------------------------ helper scripts
# summary: one table from the steps' logs (their JSON lines) and steps.tsv
cat > "$WORK/summary.py" <<'EOF'
"""One table from the steps' logs (their JSON lines) and steps.tsv."""
import json
import sys
from pathlib import Path

out, logs, total, smoke = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
steps = [(line.split("\t") + ["", "", "", ""])[:4]
         for line in (out / "steps.tsv").read_text().splitlines() if line]


def json_lines(name: str) -> list[dict]:
    """Every JSON object line of the step's log, in order."""
    path = logs / f"{name}.log"
    found = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                found.append(rec)
    return found


def last_json(name: str, key: str | None = None):
    """The last JSON line of the step's log (holding ``key``, if given)."""
    lines = [r for r in json_lines(name) if key is None or key in r]
    return lines[-1] if lines else None


def variant_records(*names: str) -> tuple[dict[str, dict], dict[str, float]]:
    """{variant: result} from the per-variant lines (stage result / first_call) and the final
    JSON of benchmark logs; {variant: first call s} of variants that never finished."""
    results, first = {}, {}
    for name in names:
        for rec in json_lines(name):
            if isinstance(rec.get("results"), dict):
                results.update(rec["results"])
            elif rec.get("stage") == "result" and "variant" in rec:
                results[rec["variant"]] = rec
            elif rec.get("stage") == "first_call" and "variant" in rec:
                first[rec["variant"]] = rec.get("first_call_s", 0.0)
    return results, {v: s for v, s in first.items() if not any(k.startswith(v) for k in results)}


def num(v, fmt: str = ".1f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "n/a"


def compile_note(r: dict) -> str:
    note = f"first call {num(r.get('first_call_s', 0))} s"
    return note + (f" (compile ~{num(r['compile_s'])} s)" if "compile_s" in r else "")


rows = []
try:
    sd, sd_first = variant_records("bench_sd_b1", "bench_sd_b4")
    pub = sd.get("public", {}).get("ms_per_image")
    for v, r in sd.items():
        target = {"ours": ">= 8x, <= 4 GiB", "ours-b4": ">= 10x"}.get(v, "")
        speed = f"{pub / r['ms_per_image']:.2f}x, " if pub else "no public run, "
        rows.append((f"DIFT-SD featurizer: {v}", f"{num(r.get('ms_per_image'))} ms/img",
                     f"{speed}{num(r.get('peak_mem_bytes', 0) / 2**30, '.2f')} GiB, "
                     f"{compile_note(r)}", target))
    for v, first_s in sd_first.items():
        rows.append((f"DIFT-SD featurizer: {v}", "not finished",
                     f"first call (compile) {num(first_s)} s, then the step ended", ""))
except Exception as err:  # a summary must print whatever a log holds
    rows.append(("DIFT-SD featurizer", "unreadable log", repr(err), ""))
try:
    adm, adm_first = variant_records("bench_adm")
    for label, r in adm.items():
        target = "<= 150 ms, <= 8 GiB" if label.startswith("ours") else ""
        rows.append((f"DIFT-ADM featurizer: {label[:40]}", f"{num(r.get('ms_per_image'))} ms/img",
                     f"{num(r.get('peak_mem_gib'), '.2f')} GiB"
                     + (f", {compile_note(r)}" if "first_call_s" in r else ""), target))
    for label, first_s in adm_first.items():
        rows.append((f"DIFT-ADM featurizer: {label}", "not finished",
                     f"first call (compile) {num(first_s)} s, then the step ended", ""))
except Exception as err:
    rows.append(("DIFT-ADM featurizer", "unreadable log", repr(err), ""))
for name in ("extract_sd", "extract_sd_12mp", "extract_sd_b4", "extract_adm"):
    r = last_json(name, "images")
    if r:
        rows.append((f"dift-sfm {name.replace('_', ' ')}",
                     f"{num(r.get('steady_img_per_s'), '.2f')} img/s steady",
                     f"{r['images']} images in {num(r.get('wall_s'))} s "
                     f"({num(r.get('overall_img_per_s'), '.2f')} img/s overall), first result "
                     f"after {num(r.get('first_result_s'))} s", ""))
r = last_json("match_sd", "pairs")
if r:
    rows.append(("dift-sfm match (SD features)", f"{num(r.get('pairs_per_s'))} pairs/s",
                 f"{r['pairs']} pairs in {num(r.get('wall_s'))} s incl. process start-up",
                 ">= 2000 pairs/s"))

# matching benchmark: wall rate, steady state, stages, kernel ceiling per descriptor size
bench = last_json("bench_match", "rows") or {}
cuda = not smoke
if bench.get("warmup_s") is not None:
    rows.append(("matching warm-up (CUDA start, cuBLAS, kernel loading)",
                 f"{num(bench['warmup_s'], '.2f')} s", "first match_features run (a few pairs); "
                 "outside every matching figure below", ""))
done_dims = set()
for r in bench.get("rows", []):
    done_dims.add(r.get("D"))
    label = f"matching {r.get('conf', '')} {r.get('keypoints')} x {r.get('D')}-D"
    target = ">= 2000 pairs/s" if cuda or r.get("D", 0) >= 512 else ""
    d = r.get("batched_detail") or {}
    extra = []
    if "batched_fp32_pairs_per_s" in r:
        extra.append(f"fp32 {r['batched_fp32_pairs_per_s']} ({r.get('batched_fp32_pairs', '?')} "
                     "pairs)")
    if "per_pair_pairs_per_s" in r:
        extra.append(f"one pair per call {r['per_pair_pairs_per_s']} "
                     f"({r.get('per_pair_pairs', '?')} pairs)")
    if "fp16_vs_fp32_same_matches" in r:
        extra.append(f"fp16 vs fp32 same matches {r['fp16_vs_fp32_same_matches']}")
    if "per_pair_vs_batched_same_matches" in r:
        extra.append(f"per pair vs batched same {r['per_pair_vs_batched_same_matches']}")
    rows.append((f"{label}: match_features, wall", f"{r.get('batched_pairs_per_s')} pairs/s",
                 f"{r.get('pairs')} pairs, {r.get('pair_batch', '?')} per batch, "
                 f"{'fp16' if r.get('fp16') else 'fp32'}, start-up + merge included; "
                 + "; ".join(extra), target))
    if "batched_steady_pairs_per_s" in r:
        rows.append((f"{label}: steady state", f"{r['batched_steady_pairs_per_s']} pairs/s",
                     f"first to last entry written ({num(d.get('steady_s'), '.2f')} s); start-up "
                     f"{num(d.get('startup_s'), '.2f')} s, after last entry "
                     f"{num(d.get('tail_s'), '.2f')} s (finalize {num(d.get('finalize_s'), '.2f')}"
                     f" s); stage s: read {num(d.get('read_s'), '.2f')} ({d.get('read_calls')} "
                     f"reads, {bench.get('images', '?')} images), prepare "
                     f"{num(d.get('prepare_s'), '.2f')}, match {num(d.get('match_s'), '.2f')} "
                     f"(synchronised), write {num(d.get('write_s'), '.2f')}", target))
    if "kernel_pairs_per_s" in r:
        fp32 = (f"; fp32 {r['kernel_fp32_pairs_per_s']} pairs/s "
                f"({r.get('kernel_fp32_batch_ms')} ms)") if "kernel_fp32_pairs_per_s" in r else ""
        rows.append((f"{label}: kernel ceiling", f"{r['kernel_pairs_per_s']} pairs/s",
                     f"mnn_batch alone, {r.get('kernel_batch')} resident pairs per call, "
                     f"{r.get('kernel_batch_ms')} ms per call (median, synchronised){fp32}", ""))
    if "pair_over_product" in r:
        rows.append((f"{label}: one pair vs its product (CPU)", f"{r['pair_over_product']}x",
                     f"pair {r.get('pair_ms')} ms, product alone {r.get('product_ms')} ms",
                     "pair <= 1.5x product"))
    if "steady_over_product" in r:
        rows.append((f"{label}: match_features pair vs its product (CPU)",
                     f"{r['steady_over_product']}x",
                     f"{r.get('steady_pair_ms')} ms per pair in steady state (reading, writing "
                     f"included), product alone {r.get('product_ms')} ms", "<= 1.5x product"))
for rec in json_lines("bench_match"):  # a size cut short after its headline run
    if rec.get("variant") == "batched" and rec.get("dim") not in done_dims and rec.get("wall_s"):
        rows.append((f"matching {rec['dim']}-D: match_features (row not finished)",
                     f"{rec.get('entries_written', 0) / rec['wall_s']:.1f} pairs/s wall",
                     f"steady {rec.get('steady_pairs_per_s')} pairs/s, read calls "
                     f"{rec.get('read_calls')}, match {num(rec.get('match_s'), '.2f')} s, "
                     "then the step ended", ">= 2000 pairs/s" if cuda else ""))
prep = (last_json("prepare_12mp", "results") or {}).get("results", {})
for label in ("dift-sd e232955 @ 12 MP", "dift-sd @ 12 MP", "sift @ 12 MP"):
    r = prep.get(label)
    if r:
        rows.append((f"preparation {label} (one core)",
                     f"{num(r.get('total_core_s'), '.2f')} core-s/img",
                     f"decode {num(r.get('decode_s'), '.2f')}, resize "
                     f"{num(r.get('resize_s'), '.2f')}, detect {num(r.get('detect_s'), '.2f')} s; "
                     f"{r.get('plan')}; {num(r.get('cores_per_gpu'))} cores per GPU at 11 img/s",
                     "<= 1.4 core-s/img" if label == "dift-sd @ 12 MP" else ""))
pipe = last_json("pipeline", "pipeline_img_per_s")
if pipe:
    rows.append((f"pipelined extract, stand-in featurizer {pipe.get('featurizer_ms')} ms",
                 f"{pipe['pipeline_img_per_s']} img/s", f"{num(pipe.get('ratio'), '.2f')} of the "
                 f"stand-in's {pipe.get('featurizer_img_per_s')} img/s, {pipe.get('workers')} "
                 "workers", ">= 0.9"))
print(f"\n# dift-sfm GPU benchmark summary ({'SMOKE, CPU, tiny models' if smoke else 'CUDA'}), "
      f"{total} s\n")
print("| measurement | value | details | target |\n|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
failed = [(n, s) for n, s, _, _ in steps if s != "ok"]
print("\nsteps: " + ", ".join(f"{n} {s} ({t} s" + (f" of {lim})" if lim else ")")
                             for n, s, t, lim in steps))
print("FAILED/SKIPPED: " + (", ".join(f"{n} ({s})" for n, s in failed) if failed else "none"))
EOF

# photos: copy up to N (IMAGE_DIR, else ../shared/data) into one flat folder, else synthesise
cat > "$WORK/make_images.py" <<'EOF'
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

# 12 MP photos: the shared phone JPEGs (4032x3024) copied to N names, else a synthetic one
cat > "$WORK/make_12mp.py" <<'EOF'
"""N 4032x3024 JPEGs: copies of ../shared/data/photos_12mp (or argv[3]), else synthetic."""
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

out, n, given = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
root = Path(given) if given else Path("..") / "shared" / "data" / "photos_12mp"
found = sorted(p for p in root.glob("*") if p.suffix.lower() in (".jpg", ".jpeg")) \
    if root.is_dir() else []
if not found:  # photo-like synthetic: smooth noise, shapes and fine grain
    rng = np.random.default_rng(0)
    img = cv2.resize((rng.random((189, 252, 3)) * 255).astype(np.uint8), (4032, 3024),
                     interpolation=cv2.INTER_CUBIC)
    for _ in range(400):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        centre = tuple(int(v) for v in rng.integers(0, (4032, 3024)))
        cv2.circle(img, centre, int(rng.integers(5, 200)), c, -1)
    img += rng.integers(0, 10, img.shape, dtype=np.uint8)
    found = [Path(sys.argv[1]).parent / "synthetic_12mp.jpg"]
    cv2.imwrite(str(found[0]), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
for i in range(n):
    shutil.copy(found[i % len(found)], out / f"{i:03d}_{found[i % len(found)].name}")
print(f"{n} 12 MP images from {found[0].parent}")
EOF

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

summarize() {  # rewrite $OUT/summary.md from what the logs hold now
    "$PYTHON" "$WORK/summary.py" "$OUT" "$LOGS" "$(( $(date +%s) - START ))" "$SMOKE" \
        > "$OUT/summary.md.tmp" 2> "$LOGS/summary.err" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
}

finish() {  # the table, printed whatever happened to the steps
    summarize || { echo "summary failed:"; cat "$LOGS/summary.err"; }
    rm -f "$OUT/summary.md.tmp"
    cat "$OUT/summary.md" 2> /dev/null
}

# record NAME STATUS SECONDS LIMIT: one line of steps.tsv, the log into logs.txt
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"
    if [ -f "$LOGS/$1.log" ]; then
        { printf '\n===== %s: %s in %s s (limit %s s) =====\n' "$1" "$2" "$3" "$4"
          tail -c 400000 "$LOGS/$1.log"; } >> "$OUT/logs.txt"
    fi
}

CURRENT=""; CURRENT_PID=""; CURRENT_T0=0; CURRENT_LIMIT=0
on_signal() {  # stop the running step (timeout passes the signal to its process group)
    trap - TERM INT
    if [ -n "$CURRENT_PID" ]; then
        kill -TERM "$CURRENT_PID" 2> /dev/null
        for _ in 1 2 3 4 5; do kill -0 "$CURRENT_PID" 2> /dev/null || break; sleep 1; done
        kill -KILL -- "-$CURRENT_PID" 2> /dev/null
        record "$CURRENT" killed "$(( $(date +%s) - CURRENT_T0 ))" "$CURRENT_LIMIT"
    fi
    echo "== interrupted: summary of what finished"
    finish
    exit 143
}
trap on_signal TERM INT

# step NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S, budget left), log to $LOGS/NAME.log
step() {
    local name=$1 cap=$2; shift 2
    local left=$((BUDGET_S - ($(date +%s) - START) - GRACE_S))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        record "$name" skipped 0 "$((limit > 0 ? limit : 0))"
        echo "== $name: skipped (time budget spent)"
        summarize
        return 0
    fi
    echo "== $name (limit ${limit}s): $*"
    CURRENT=$name; CURRENT_T0=$(date +%s); CURRENT_LIMIT=$limit
    # in the background, so that a TERM reaches on_signal at once (bash runs traps only
    # between foreground commands); stdin from /dev/null, as no step reads it
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1 < /dev/null &
    CURRENT_PID=$!
    wait "$CURRENT_PID"
    local rc=$? t=$(($(date +%s) - CURRENT_T0))
    CURRENT=""; CURRENT_PID=""
    local status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timeout"
    elif [ $rc -ne 0 ]; then status="failed(rc=$rc)"; fi
    record "$name" "$status" "$t" "$limit"
    echo "   -> $status in ${t}s"
    [ "$status" = ok ] || tail -n 5 "$LOGS/$name.log" | sed 's/^/   | /'
    summarize
    return 0
}

# ------------------------------------------------------------------ setup
if [ "$SMOKE" != 1 ] && [ -d wheels ] && ls wheels/*.whl > /dev/null 2>&1; then
    # --no-deps: the machine has the rest (torch, transformers, huggingface_hub, ...); not
    # in a smoke run, which uses this machine's environment as it is (the wheels are cp312)
    step pip_wheels 60 "$PYTHON" -m pip install -q --no-deps wheels/*.whl
fi
if ! "$PYTHON" -c "import dift_sfm.cli" > /dev/null 2>&1 || [ "$SMOKE" != 1 ]; then
    step pip_editable 45 "$PYTHON" -m pip install -e . --no-deps --no-build-isolation -q
fi
step env 30 "$PYTHON" -c "
import os, platform, torch
print('python', platform.python_version(), 'torch', torch.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
print('compile cache', os.environ.get('TORCHINDUCTOR_CACHE_DIR'))
"
if [ "$SMOKE" = 1 ]; then
    DEV=cpu
    SD_BENCH=(--arch tiny --device cpu --size 64 --ensemble 2 --warmup 1 --repeats 2 --isolated)
    ADM_BENCH=(--arch tiny --device cpu --size 64 --ensemble 2 --warmup 0 --repeats 1)
    ARCH_SD=tiny; ARCH_ADM=tiny; N_IMAGES=6; N_12MP=3
    SD_SET=(--max-keypoints 256 --set 'featurizer.img_size=[64,64]' --set featurizer.ensemble=2)
    ADM_SET=(--max-keypoints 256 --set 'featurizer.img_size=[64,64]' --set featurizer.ensemble=2
             --set featurizer.output_block=7)
    MATCH_ARGS=(--device cpu)
else
    DEV=cuda
    SD_BENCH=(--device cuda --size 768 --ensemble 8 --warmup 2 --repeats 10)
    ADM_BENCH=(--device cuda --size 768 --ensemble 4 --warmup 2 --repeats 5)
    ARCH_SD=sd21; ARCH_ADM=adm256; N_IMAGES=32; N_12MP=48
    SD_SET=(); ADM_SET=()
    MATCH_ARGS=(--device cuda)
fi

# ------------------------------------------------------------------ matching, SD featurizer
# Most important first. bench_match prints its JSON (all rows so far) after each descriptor
# size, bench_sd each variant's JSON line as soon as it is measured, so a timeout keeps the
# finished parts. bench_sd's compiled graphs (same 768x768, ensemble 8, batch 1 as the
# dift-sd conf) land in the shared compile cache, which extract_sd then reads.
step bench_match "${MATCH_CAP:-100}" "$PYTHON" benchmarks/bench_match_gpu.py "${MATCH_ARGS[@]}"
step bench_sd_b1 "${SD_B1_CAP:-170}" "$PYTHON" benchmarks/bench_sd.py "${SD_BENCH[@]}" --batch 1

# ------------------------------------------------------------------ photos + random models
IMAGES="$WORK/images"
mkdir -p "$IMAGES"
step images 30 "$PYTHON" "$WORK/make_images.py" "$IMAGES" "$N_IMAGES" "${IMAGE_DIR:-}"
step write_sd_model 120 "$PYTHON" benchmarks/bench_sd.py --write-model "$WORK/sd-random" --arch "$ARCH_SD" --device "$DEV"

# ------------------------------------------------------------------ end to end: SD, matching
SD_MODEL_ARGS=(--model "$WORK/sd-random" --set "featurizer.prompt_embeds=$WORK/sd-random/prompt_embeds.safetensors")
step extract_sd 90 "$PYTHON" "$WORK/timed_cli.py" extract "$IMAGES" -o "$WORK/feats-sd.h5" --conf dift-sd \
    --device "$DEV" "${SD_MODEL_ARGS[@]}" "${SD_SET[@]}" --overwrite
# `dift-sfm match` on real SD features: cheap (no model), so right after the features exist
step pairs 30 "$PYTHON" "$WORK/timed_cli.py" pairs exhaustive "$IMAGES" -o "$WORK/pairs.txt"
step match_sd 45 "$PYTHON" "$WORK/timed_cli.py" match "$WORK/pairs.txt" --features "$WORK/feats-sd.h5" \
    -o "$WORK/matches-sd.h5" --device "$DEV" --overwrite

# ------------------------------------------------------------------ 12 MP photos (issue 21)
# the default dift-sd conf on camera photos: JPEGs decoded at 1/2, DoG at 1600 px, the
# preparation pool (min(8, cores) workers) beside the GPU; and the per-core stage costs
IMAGES12="$WORK/images_12mp"
mkdir -p "$IMAGES12"
step images_12mp 30 "$PYTHON" "$WORK/make_12mp.py" "$IMAGES12" "$N_12MP" "${IMAGE_DIR_12MP:-}"
step extract_sd_12mp 75 "$PYTHON" "$WORK/timed_cli.py" extract "$IMAGES12" -o "$WORK/feats-sd-12mp.h5" \
    --conf dift-sd --device "$DEV" "${SD_MODEL_ARGS[@]}" "${SD_SET[@]}" --overwrite
step prepare_12mp 90 "$PYTHON" benchmarks/bench_prepare.py --sizes 12 --repeats 1

# ------------------------------------------------------------------ ADM
step bench_adm 120 "$PYTHON" benchmarks/bench_adm.py "${ADM_BENCH[@]}"
step write_adm_model 90 "$PYTHON" benchmarks/bench_adm.py --write-model "$WORK/adm-random/adm_weights.safetensors" --arch "$ARCH_ADM" --device "$DEV"
step extract_adm 90 "$PYTHON" "$WORK/timed_cli.py" extract "$IMAGES" -o "$WORK/feats-adm.h5" --conf dift-adm \
    --device "$DEV" --model "$WORK/adm-random/adm_weights.safetensors" "${ADM_SET[@]}" --overwrite

# ------------------------------------------------------------------ SD batch 4, pipeline
# batch 4 compiles its own graphs (compile_dynamic_batch is off by default): cold the first time
step bench_sd_b4 "${SD_B4_CAP:-100}" "$PYTHON" benchmarks/bench_sd.py "${SD_BENCH[@]}" --batch 4 --no-public
step extract_sd_b4 60 "$PYTHON" "$WORK/timed_cli.py" extract "$IMAGES" -o "$WORK/feats-sd-b4.h5" --conf dift-sd \
    --device "$DEV" "${SD_MODEL_ARGS[@]}" "${SD_SET[@]}" --set featurizer.batch_size=4 --overwrite
step pipeline 45 "$PYTHON" benchmarks/bench_pipeline.py "$IMAGES" --featurizer-ms "${PIPELINE_MS:-60}" --repeat 4

# ------------------------------------------------------------------ summary
trap - TERM INT
finish
