#!/usr/bin/env bash
# The GPU checks of gcg (issue #15), one command on each side:
#
#   tools/gpu-check.sh build   here, no GPU needed: the CUDA build through tools/cuda-env.sh (the
#                              wheels venv is made when missing), the `gcg` binary and the parity
#                              test binaries, and the PyTorch anchor, packed into gpu-check/ (ignored
#                              by git; what the device tool carries)
#   tools/gpu-check.sh run     on the GPU machine, from the repository root, with gpu-check/ there:
#                              every check below, each under its own time limit, results as JSON
#                              lines in $OUT/gpu-check.jsonl (+ one log per check), so a check cut
#                              short still leaves the others' results
#
# With the device tool: run(command="bash tools/gpu-check.sh run", carry=["gpu-check"],
# timeout_s=560). There: LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64 (set below).
#
# The checks (issue #15, in this order, cheap ones first):
#   1. parity   the parity suites (ViT, Q-Former, T5, CLIP, LMM, grounding) on CUDA in f32
#               (GCG_TEST_DEVICE=cuda; the committed fixtures, ≤1e-4 as on the CPU)
#   2. cpu-vs-cuda  gcg demo --quick on the CPU gives a world, a store and trained runs; then
#               the same tiny grounding run is trained and predicted with device = cpu and with
#               device = cuda, `gcg features` extracts the world's frames on both, and the
#               results are compared (losses, answers, moments, p(t), features)
#   3. bench    gcg bench forward / train-step on instructblip-flan-t5-xl shapes on CUDA beside
#               torch_anchor.py full (PyTorch + transformers on the same GPU), one JSON each
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=gpu-check
PARITY_TESTS="parity_vision parity_qformer parity_t5 parity_clip parity_lmm parity_grounding"

build() {
  local venv=${CUDA_VENV:-/work/cuda-venv}
  if ! ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
      nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 "nvidia-cublas<13.1" nvidia-curand nvidia-cuda-nvrtc==13.0.88
  fi
  # shellcheck source=tools/cuda-env.sh
  CUDA_VENV=$venv source tools/cuda-env.sh
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
  # A link that names driver symbols the stub lacks: add them (cuda-env.sh rebuilds the stub), retry.
  local links=${CUDA_LINK_DIR:-$venv/cuda-links} log
  log=$(mktemp)
  for _ in 1 2 3; do
    if cargo build --release -p gcg-cli --features cuda 2>&1 | tee "$log"; then break; fi
    local missing
    missing=$(grep -o 'undefined symbol: cu[A-Za-z0-9_]*' "$log" | awk '{print $3}' | sort -u)
    [ -n "$missing" ] || { rm -f "$log"; exit 1; }
    echo "adding to the stub libcuda: $missing"
    printf '%s\n' $missing >>"$links/extra-symbols"
    CUDA_VENV=$venv source tools/cuda-env.sh
  done
  rm -f "$log"
  [ -x "$CARGO_TARGET_DIR/release/gcg" ] || { echo "the CUDA build failed" >&2; exit 1; }
  local list
  list=$(mktemp)
  cargo test --release -p gcg --features cuda --no-run --message-format=json >"$list"
  rm -rf "$PACK" && mkdir -p "$PACK/bin"
  cp "$CARGO_TARGET_DIR/release/gcg" "$PACK/bin/gcg"
  for t in $PARITY_TESTS; do
    local exe
    exe=$(grep -o "\"executable\":\"[^\"]*/deps/$t-[0-9a-f]*\"" "$list" | tail -n1 | sed 's/"executable":"//; s/"$//')
    [ -n "$exe" ] || { echo "no test binary for $t" >&2; exit 1; }
    cp "$exe" "$PACK/bin/$t"
  done
  rm -f "$list"
  strip "$PACK"/bin/* || true
  # The test binaries find the committed fixtures through the absolute crate path they were
  # built in; `run` links that path to the repository on the GPU machine.
  printf '%s\n' "$PWD" >"$PACK/built-in"
  local anchor=${TORCH_ANCHOR:-../shared/bench/torch_anchor.py}
  cp "$anchor" "$PACK/torch_anchor.py"
  tar -C "$PACK" -cJf "$PACK.tar.xz" bin && rm -rf "$PACK/bin" && mv "$PACK.tar.xz" "$PACK/bin.tar.xz"
  du -sh "$PACK"
  echo "ready: run(command=\"bash tools/gpu-check.sh run\", carry=[\"$PACK\"], timeout_s=560)"
}

# One JSON line of results: check name, status, seconds, and a JSON value.
record() { printf '{"check": "%s", "status": "%s", "seconds": %s, "result": %s}\n' "$1" "$2" "$3" "$4" >>"$OUT/gpu-check.jsonl"; }

# Run a check under a time limit; its output goes to $OUT/<name>.log.
check() {
  local name=$1 limit=$2
  shift 2
  local t0 status
  t0=$(date +%s.%N)
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then status=ok; else status="failed($?)"; fi
  local secs
  secs=$(echo "$(date +%s.%N) - $t0" | bc)
  local result
  result=$(grep -h '^{' "$OUT/$name.log" 2>/dev/null | tail -n 20 | paste -sd, - || true)
  record "$name" "$status" "$secs" "[${result}]"
}

parity() {
  local rc=0
  for t in $PARITY_TESTS; do
    GCG_TEST_DEVICE=cuda "$BIN/$t" --test-threads=1 || rc=1
  done
  return $rc
}

# A tiny grounding run on the demo's store, on `device`.
tiny_run() {
  local device=$1 w=$2
  cat >"$w/run-$device.toml" <<EOF
run_dir = "$w/run-$device"
device = "$device"
[weights]
preset = "tiny"
tokenizers = "$w/demo/tokenizers"
fan_in_init = true
[model]
mode = "grounding"
alpha_con = 0.1
answer_format = "text"
[model.lmm]
spatial = false
dropout = 0.0
[model.grounding]
heads = 2
dropout = 0.0
[model.grounding.topk]
num_samples = 100
[data]
store = "$w/demo/store"
train = "$w/demo/world/train.csv"
val = "$w/demo/world/val.csv"
test = "$w/demo/world/test.csv"
test_grounding = "$w/demo/world/gsub_test.json"
workers = 1
[train]
epochs = 1
batch_size = 8
lr = 3e-4
grounding_lr = 3e-3
train_t5 = true
EOF
  "$BIN/gcg" train --config "$w/run-$device.toml" --quiet
}

cpu_vs_cuda() {
  local w=/tmp/gcg-gpu-check
  rm -rf "$w" && mkdir -p "$w"
  "$BIN/gcg" demo --quick --quiet --out "$w/demo"
  tiny_run cpu "$w"
  tiny_run cuda "$w"
  for d in cpu cuda; do
    "$BIN/gcg" features --videos "$w/demo/world/frames" --store "$w/features-$d" --preset tiny --random-weights \
      --device "$d" --dtype f32 --num-frames 8
  done
  python3 - "$w" <<'PY'
import json, sys, glob
import numpy as np
from safetensors.numpy import load_file
w = sys.argv[1]
def rows(p): return {(r["video"], str(r["qid"])): r for r in map(json.loads, open(p))}
def losses(p): return [json.loads(l)["loss"] for l in open(p) if '"loss"' in l]
cpu, gpu = rows(f"{w}/run-cpu/predictions-test.jsonl"), rows(f"{w}/run-cuda/predictions-test.jsonl")
same_answer = sum(cpu[k]["prediction"] == gpu[k]["prediction"] for k in cpu) / len(cpu)
same_moments = sum(cpu[k].get("moments") == gpu[k].get("moments") for k in cpu) / len(cpu)
curve = max((np.abs(np.array(cpu[k]["curve"]) - np.array(gpu[k]["curve"])).max() for k in cpu if cpu[k].get("curve")), default=0.0)
lc, lg = losses(f"{w}/run-cpu/metrics.jsonl"), losses(f"{w}/run-cuda/metrics.jsonl")
loss = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(lc, lg))
def feats(d):
    out = {}
    for f in sorted(glob.glob(f"{w}/{d}/shards/videos-*.safetensors")):
        out.update(load_file(f))
    return out
fc, fg = feats("features-cpu"), feats("features-cuda")
feat = max(float(np.abs(fc[k].astype(np.float32) - fg[k].astype(np.float32)).max() / (np.abs(fc[k].astype(np.float32)).max() + 1e-6)) for k in fc)
print(json.dumps({"same_answer": same_answer, "same_moments": same_moments, "curve_max_abs": float(curve),
                  "loss_max_rel": loss, "steps": [len(lc), len(lg)], "features_max_rel": feat, "videos": [len(fc), len(fg)]}))
PY
}

bench() {
  "$BIN/gcg" bench forward --preset instructblip-flan-t5-xl --device cuda --batch 1
  "$BIN/gcg" bench forward --preset instructblip-flan-t5-xl --device cuda --batch 32 --vit-frames 256
  "$BIN/gcg" bench train-step --preset instructblip-flan-t5-xl --device cuda --batch 4
  "$BIN/gcg" bench train-step --preset instructblip-flan-t5-xl --device cuda --batch 16
  python3 -c 'import torch, transformers; print("{\"torch\": \"%s\", \"transformers\": \"%s\", \"gpu\": \"%s\"}" % (torch.__version__, transformers.__version__, torch.cuda.get_device_name(0)))'
  PYTHONUNBUFFERED=1 DTYPE=bfloat16 python3 "$PACK/torch_anchor.py" full
}

run() {
  : "${OUT:?run this on the GPU machine through the device tool (OUT is unset)}"
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
  BIN=/tmp/gcg-gpu-check-bin
  rm -rf "$BIN" && mkdir -p "$BIN" && tar -C "$BIN" -xJf "$PACK/bin.tar.xz" && BIN=$BIN/bin
  local built
  built=$(cat "$PACK/built-in")
  if [ "$built" != "$PWD" ] && [ ! -e "$built" ]; then mkdir -p "$(dirname "$built")" && ln -s "$PWD" "$built"; fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1 || true
  check parity 120 parity
  check cpu-vs-cuda 150 cpu_vs_cuda
  check bench 270 bench
  cat "$OUT/gpu-check.jsonl"
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) echo "usage: tools/gpu-check.sh build|run" >&2; exit 2 ;;
esac
