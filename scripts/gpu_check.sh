#!/usr/bin/env bash
# The GPU check of issue 15 on one GPU, data from ../shared/datasets/. On an H200 (2026-11-26) steps 1 and 2 took
# over 4 minutes (the mbv2 pair ran past a 110 s limit), step 3 took 197 s at 8 epochs of each stage, and step 4
# about 170 s per compiled run: all four steps need about 15 minutes, more than one device call allows; pick
# steps with KDRUN_CHECK_STEPS and give the device call a timeout that leaves room for a rerun.
#   1. scripts/bench_speed.py --device cuda, bf16 + channels_last + compile, kdrun against the reference loop,
#      for resnet32x4 -> resnet8x4 and resnet18 -> mbv2: images/s per stage, the teacher stage's model FLOP
#      utilisation (MFU: 3 x forward FLOPs per image x images/s / the GPU's peak bf16 FLOP/s), cached KD
#      against CE alone;
#   2. a 1-GPU torchrun run end to end (c10d rendezvous, DDP code path);
#   3. CIFAR-10, resnet56 -> resnet20 (bf16, channels_last), KDRUN_CHECK_EPOCHS per stage, with the test accuracies;
#   4. resnet8x4 -> mbv2, kdrun alone, with bf16, channels_last and compile each turned off in turn (which of the
#      three makes mbv2's step slower than the plain fp32 loop's).
# It ends with one table.
#
#   scripts/gpu_check.sh              # on the GPU machine
#   scripts/gpu_check.sh --dry-run    # the same steps on the CPU, tiny (also KDRUN_GPU_CHECK_DRY=1)
#
# Environment: PYTHON (default .venv/bin/python, else python3), KDRUN_DATA (default ../shared/datasets),
# KDRUN_CHECK_DIR (outputs and the extracted data; default outputs/gpu_check), KDRUN_PEAK_TFLOPS (the GPU's
# dense bf16 peak; default 989, an H100 SXM or H200), KDRUN_CHECK_EPOCHS (step 3's epochs per stage; default 8),
# KDRUN_CHECK_STEPS (which steps, default "1 2 3 4"), KDRUN_CHECK_REPEATS (step 4's rounds per row, default 1), KDRUN_CHECK_STEP_S (> 0: each step is stopped after this many seconds, and the table still prints what the
# others measured: a short lease loses one step, not the whole check). A machine without hydra/omegaconf: stage the wheels first with
# ../shared/device/prep.sh (into .whl/); the script installs .whl/*.whl into a private folder when present.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

dry=${KDRUN_GPU_CHECK_DRY:-0}
[ "${1:-}" = "--dry-run" ] && dry=1
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=$root/.venv/bin/python; else py=python3; fi
fi
out=${KDRUN_CHECK_DIR:-outputs/gpu_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
data=${KDRUN_DATA:-../shared/datasets}
t_start=$(date +%s)
epochs=${KDRUN_CHECK_EPOCHS:-8}
step_s=${KDRUN_CHECK_STEP_S:-0}
steps=" ${KDRUN_CHECK_STEPS:-1 2 3 4} "
wanted() { [[ "$steps" == *" $1 "* ]]; }
step() {  # one step of the check; a failure or a time-out is reported and the check goes on to the table
  local rc=0
  if [ "$step_s" -gt 0 ]; then timeout "$step_s" "$@" || rc=$?; else "$@" || rc=$?; fi
  [ "$rc" = 0 ] || echo "gpu_check: step '$*' ended with exit code $rc$([ "$rc" = 124 ] && echo " (time-out, ${step_s} s)")" >&2
  return 0
}

if compgen -G ".whl/*.whl" > /dev/null; then  # wheels the machine lacks, staged by prep.sh
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$out/site" .whl/*.whl
  export PYTHONPATH="$out/site:$root${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -c "import hydra, omegaconf, tqdm, torch" || {
  echo "gpu_check: missing Python packages; run ../shared/device/prep.sh tqdm (stages .whl/) and carry .whl" >&2
  exit 2
}

# ---------------------------------------------------------------- data: CIFAR-10 JPEG folder, extracted once
cifar=$out/cifar10-jpg
if [ ! -d "$cifar/train" ]; then
  mkdir -p "$cifar"
  tar -xzf "$data/cifar10-jpg.tar.gz" -C "$cifar"
  if [ ! -d "$cifar/train" ]; then  # the tarball holds one top folder
    inner=$(find "$cifar" -mindepth 2 -maxdepth 2 -type d -name train | sed -n 1p)
    mv "$(dirname "$inner")"/* "$cifar"/
  fi
fi
if [ "$dry" = 1 ]; then  # a few images per class: every step runs, in seconds
  mini=$out/cifar10-mini
  if [ ! -d "$mini/train" ]; then
    for split in train test; do
      for cls in "$cifar/$split"/*/; do
        c=$(basename "$cls")
        mkdir -p "$mini/$split/$c"
        find "$cls" -name '*.jpg' | sort | sed -n "1,$([ $split = train ] && echo 24 || echo 8)p" \
          | xargs -I{} cp {} "$mini/$split/$c/"
      done
    done
  fi
  cifar=$mini
fi
mean="[0.4913,0.4821,0.4465]"
std="[0.2452,0.2428,0.2606]"

if [ "$dry" = 1 ]; then
  device=cpu
  bench=(--device cpu --subset 96 --steps 4 --warmup 2 --repeats 1 --batch 16 --eval-batch 64 --workers 1)
  speed=()
  pairs=("resnet8x4 resnet8x4")
  run_args=(teacher=resnet8 student=resnet8 trainer.teacher_epochs=1 trainer.epochs=1 trainer.batch_size=64
            trainer.device=cpu)
  launcher=(--standalone --nproc-per-node=1)
else
  device=cuda
  bench=(--device cuda --subset 10000 --steps 60 --warmup 15 --repeats 1 --batch 256 --eval-batch 1024 --workers 8)
  speed=(--bf16 --channels-last --compile)
  pairs=("resnet32x4 resnet8x4" "resnet18 mbv2")
  run_args=(experiment=cifar10_resnet56_resnet20 "trainer.teacher_epochs=$epochs" "trainer.epochs=$epochs" optim.schedule=cosine
            trainer.precision=bf16 trainer.channels_last=true cache.enabled=true trainer.device=cuda)
  launcher=(--standalone --nproc-per-node=1)
fi
common=(dataset=imagefolder "dataset.root=$cifar" "dataset.mean=$mean" "dataset.std=$std" trainer.latency=false
        store.enabled=false "dataset.cache_dir=$out/decoded")

# ---------------------------------------------------------------- 1. stage throughput against the reference
wanted 1 && for pair in "${pairs[@]}"; do
  read -r teacher student <<< "$pair"
  echo "== bench_speed $teacher -> $student ($device)"
  step "$py" scripts/bench_speed.py --root "$cifar" --teacher "$teacher" --student "$student" "${bench[@]}" "${speed[@]}" \
    --json "$out/bench_${teacher}_${student}.json" 2>&1 | tee "$out/bench_${teacher}_${student}.log"
done

# ---------------------------------------------------------------- 2. torchrun, one GPU, end to end
if wanted 2; then
  echo "== torchrun ${launcher[*]} kdrun train (1 epoch)"
  rm -rf "$out/torchrun"
  step "$py" -m torch.distributed.run "${launcher[@]}" -m kdrun.cli train "${common[@]}" teacher=resnet20 student=resnet8 \
    trainer.teacher_epochs=1 trainer.epochs=1 "trainer.device=$device" "hydra.run.dir=$out/torchrun" 2>&1 \
    | tail -n 12
fi

# ---------------------------------------------------------------- 3. CIFAR-10, $epochs epochs (dry run: 1)
if wanted 3; then
  echo "== kdrun train: CIFAR-10 (${run_args[*]})"
  rm -rf "$out/cifar10"
  step "$py" -m kdrun.cli train "${common[@]}" "${run_args[@]}" "hydra.run.dir=$out/cifar10" 2>&1 | tail -n 12
fi

# ---------------------------------------------------------------- 4. mbv2: each speed option off in turn
if wanted 4; then
  ablate_pair=$([ "$dry" = 1 ] && echo "resnet8x4 resnet8x4" || echo "resnet8x4 mbv2")  # a small teacher: mbv2 is timed
  read -r teacher student <<< "$ablate_pair"
  rm -f "$out"/ablate_*.json  # no row from an earlier check
  for off in none --bf16 --channels-last --compile; do
    flags=()
    for f in "${speed[@]}"; do [ "$f" = "$off" ] || flags+=("$f"); done
    echo "== bench_speed $teacher -> $student, kdrun alone, off: $off"
    step "$py" scripts/bench_speed.py --root "$cifar" --teacher "$teacher" --student "$student" "${bench[@]}" \
      "${flags[@]}" --sides kdrun --repeats "${KDRUN_CHECK_REPEATS:-1}" --json "$out/ablate_${off#--}.json" 2>&1 | tail -n 4
  done
fi

# ---------------------------------------------------------------- the table
"$py" - "$out" "$device" "$(( $(date +%s) - t_start ))" "${KDRUN_PEAK_TFLOPS:-989}" "$steps" <<'EOF'
import glob
import json
import os
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdrun.models import build_model

out, device, seconds, peak = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) * 1e12
steps = sys.argv[5].split()
rows = []


def med(results, part, stage):
    return statistics.median(r[part][stage] for r in results) if results else float("nan")


def forward_flops(name: str) -> float:
    model = build_model(name, 10, 3, 32).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    return counter.get_total_flops()


for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    b = json.load(open(path))
    a, kd, rf = b["args"], b["kdrun"], b["reference"]
    pair = f"{a['teacher']}->{a['student']}"
    for stage in ("teacher", "cache", "distil", "student_ce"):
        k, r = med(kd, "ips", stage), med(rf, "ips", stage)
        rows.append((f"{pair} {stage} img/s", f"{k:,.0f}", f"ref {r:,.0f} ({k / r:.2f}x)"))
    ips = med(kd, "ips", "teacher")
    mfu = 3 * forward_flops(a["teacher"]) * ips / peak
    rows.append((f"{pair} teacher MFU", f"{100 * mfu:.1f}%" if device == "cuda" else "n/a (CPU)",
                 f"3 x fwd FLOPs x img/s / {peak / 1e12:.0f} TFLOP/s"))
    rows.append((f"{pair} cached KD / CE alone", f"{med(kd, 'ips', 'distil') / med(kd, 'ips', 'student_ce'):.2f}x",
                 "student images/s"))

for off in ("none", "bf16", "channels-last", "compile") if "4" in steps else ():
    path = os.path.join(out, f"ablate_{off}.json")
    if os.path.exists(path):
        b = json.load(open(path))
        kd, a = b["kdrun"], b["args"]
        rows.append((f"{a['student']} off: {off}", f"{med(kd, 'ips', 'student_ce'):,.0f}",
                     f"student CE img/s; distil {med(kd, 'ips', 'distil'):,.0f}; teacher {med(kd, 'ips', 'teacher'):,.0f}"))


def run_rows(label: str, run_dir: str) -> None:
    path = os.path.join(out, run_dir, "metrics.json")
    if not os.path.exists(path):
        rows.append((label, "FAILED", f"no {run_dir}/metrics.json"))
        return
    m = json.load(open(path))
    for name in ("teacher", "student", "baseline"):
        t = m["test"].get(name)
        if t is not None:
            t = t.get("last", t)
            rows.append((f"{label} {name} top-1", f"{t['top1']:.2f}", f"{m['stages'].get(name, {}).get('epochs', '')}"
                         " epochs"))
    rows.append((f"{label} wall time", f"{m['timings_s'].get('total', 0):.0f} s", m["device"]))


if "2" in steps:
    run_rows("torchrun 1 GPU" if device == "cuda" else "torchrun 1 process", "torchrun")
if "3" in steps:
    run_rows("CIFAR-10", "cifar10")
rows.append(("whole check", f"{seconds} s", "dry run on the CPU" if device == "cpu" else torch.cuda.get_device_name()))
w = max(len(r[0]) for r in rows)
print(f"\n{'check':<{w}}  {'value':>12}  note")
for name, value, note in rows:
    print(f"{name:<{w}}  {value:>12}  {note}")
EOF
