#!/usr/bin/env bash
# The host suite's node tests on CUDA with ComfyUI 0.33's defaults (DynamicVRAM on, on NVIDIA):
# the one check of "training never goes through the dynamic patcher" that a CPU cannot make.
#
#   scripts/gpu_host_check.sh --prepare    here: copy the host tree, fetch the wheels, split them in parts
#   scripts/gpu_host_check.sh --dry-run    here: check what would travel, and collect the tests
#                                          (PYTHON=<a python with torch and pytest>, default python3)
#   then, with the device tool, from the repository root, one call per part (the last one runs the tests):
#       run(command="bash scripts/gpu_host_check.sh --install p1", carry=[".whl/p1"], timeout_s=120)
#       ...                                                          (--prepare prints the exact calls)
#       run(command="bash scripts/gpu_host_check.sh --install pN --run", carry=[".hosts", ".whl/pN"], timeout_s=480)
#   or, instead of the tests (device time is 15 min in all), the default edit against the cost model (#20 item 5):
#       the same calls, the last one with --bench instead of --run:
#       run(command="bash scripts/gpu_host_check.sh --install pN --bench", carry=[".hosts", ".whl/pN"], timeout_s=540)
#   and, on the same warm machine with time left, the older speed rows (issue "Lean training", item 6):
#       run(command="bash scripts/gpu_host_check.sh --bench-speed", carry=[".hosts"], timeout_s=480)
#
# Why parts: the device tool carries at most 64 MiB a call, and the host's requirements that the GPU
# image lacks come to more (comfy-kitchen's CUDA kernels alone are 45 MB). Each call installs its part
# into .site/ in the repository copy there, which stays between calls while the machine is warm.
# --prepare copies the ComfyUI tree at $COMFYUI_PATH (a local checkout; nothing of ComfyUI is
# downloaded) into .hosts/comfyui without the parts the in-process tests never read (API nodes,
# blueprints, its own tests), and downloads, for the GPU machine's Python 3.12, the wheels of the
# host's requirements its image lacks (the device tool's KINDS.md lists what it has: torch,
# torchvision, torchaudio, transformers, safetensors, pytest, ...). comfy-kitchen's AMD (HIP) backend
# is left out of its wheel: it is never loaded on NVIDIA. .hosts/ and .whl/ are ignored by git.
# Output of the last call: the GPU, the pytest log and a JUnit file in $OUT (or ./gpu_check_out).
set -euo pipefail
cd "$(dirname "$0")/.."
HOST_DIR=.hosts/comfyui
# The versions the CPU host environment of these tests resolved for ComfyUI 0.33.0's requirements.
WHEELS="torchsde==0.2.6 trampoline==0.1.2 comfy-kitchen==0.2.31 comfy-aimdo==0.4.13 av==18.1.0 alembic==1.20.1
mako==1.4.3 sqlalchemy==2.1.9 greenlet==3.5.6 simpleeval==1.0.8 blake3==1.0.11 spandrel==0.4.2 kornia==0.9.0
kornia-rs==0.2.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
pydantic-settings==2.16.3 python-dotenv==1.2.4 diffusers==0.42.1 importlib-metadata==10.2.0 zipp==4.1.2"
TESTS="tests/host/test_host_harness.py tests/host/test_imagic_nodes.py"
BUDGET_MB=58   # per call, the working tree included (the tool allows 64 MiB)

tree_mb() { git ls-files -z | xargs -0 du -cm 2>/dev/null | tail -1 | cut -f1; }

# The default edit on CUDA against the cost model (issue #20 item 5): benchmarks/gpu_edit.py on a real-size
# random-weight Flux.1 dev in fp8 and SDXL, each stage at 1024 and 512 px, Flux's full-width block costs, one
# edit end to end at 1024 px (50 + 50 steps, 3 etas). About 4-5 min on an H200 (benchmarks/README.md).
# GPU_EDIT_ARGS replaces the arguments (e.g. "--models sdxl --no-e2e" for a short rerun).
BENCH_ARGS="--device cuda --blocks --sizes 1024,512 --warmup 1 --steps 3 --embedding-steps 50 --finetune-steps 50 --etas 0.7,0.9,1.0"
bench() {
  OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
  export PYTHONPATH=$PWD/.site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  # shellcheck disable=SC2086
  COMFYUI_PATH=$HOST_DIR python3 benchmarks/gpu_edit.py ${GPU_EDIT_ARGS:-$BENCH_ARGS} --out "$OUT" 2>&1 \
      | grep -v 'it/s]$' | tee "$OUT/gpu_edit.log"
}

case "${1:-}" in
--prepare)
  : "${COMFYUI_PATH:?set COMFYUI_PATH to a local ComfyUI 0.33 tree}"
  # .hosts/ .whl/ .site/ gpu_check_out/ are in .gitignore (so they travel only when carried; .git is a file in a worktree)
  rm -rf .hosts .whl && mkdir -p .hosts/comfyui .whl/all
  tar -C "$COMFYUI_PATH" --exclude=.git --exclude=__pycache__ --exclude=./models --exclude=./output \
      --exclude=./input --exclude=./temp --exclude=./user --exclude=./comfy_api_nodes --exclude=./blueprints \
      --exclude=./tests --exclude=./tests-unit -cf - . | tar -C "$HOST_DIR" -xf -
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl/all $WHEELS
  kitchen=$(ls .whl/all/comfy_kitchen-*.whl)
  zip -q -d "$kitchen" 'comfy_kitchen/backends/hip/*' > /dev/null
  # Greedy split, largest first; the host tree rides with the last part.
  python3 - "$BUDGET_MB" "$(tree_mb)" "$(du -sm .hosts | cut -f1)" <<'PY'
import os, shutil, sys
budget, tree, host = (int(a) for a in sys.argv[1:])
# A wheel too big to travel beside the tree (comfy-kitchen: 46 MB against 58 - 22) goes in chunks;
# --install gathers them in .site/.chunks and installs the wheel once its last chunk has come.
room = (budget - tree - 1) * 2**20
for f in list(os.listdir(".whl/all")):
    size = os.path.getsize(f".whl/all/{f}")
    if size / 2**20 + tree > budget:
        n = -(-size // room)
        with open(f".whl/all/{f}", "rb") as src:
            for i in range(1, n + 1):
                with open(f".whl/all/{f}.chunk-{i:02d}-of-{n:02d}", "wb") as dst:
                    dst.write(src.read(room))
        os.remove(f".whl/all/{f}")
files = sorted(os.listdir(".whl/all"), key=lambda f: -os.path.getsize(f".whl/all/{f}"))
parts = []
for f in files:
    mb = os.path.getsize(f".whl/all/{f}") / 2**20
    for p in parts:
        if p[0] + mb + tree <= budget:
            p[0] += mb; p[1].append(f); break
    else:
        parts.append([mb, [f]])
parts.sort(key=lambda p: p[0], reverse=True)
if parts[-1][0] + tree + host > budget:
    parts.append([0.0, []])
for i, (mb, fs) in enumerate(parts, 1):
    os.makedirs(f".whl/p{i}")
    for f in fs:
        shutil.move(f".whl/all/{f}", f".whl/p{i}/{f}")
    print(f"part p{i}: {mb:.0f} MB + the tree {tree} MB" + (f" + host {host} MB" if i == len(parts) else ""))
shutil.rmtree(".whl/all")
n = len(parts)
for i in range(1, n + 1):
    last = i == n
    print(f'  run(command="bash scripts/gpu_host_check.sh --install p{i}' + (' --run"' if last else '"')
          + (f', carry=[".hosts", ".whl/p{i}"], timeout_s=480)' if last else f', carry=[".whl/p{i}"], timeout_s=120)'))
print(f'  or, for the default edit against the cost model, the last one as:\n'
      f'  run(command="bash scripts/gpu_host_check.sh --install p{n} --bench", carry=[".hosts", ".whl/p{n}"], timeout_s=540)')
PY
  exit 0 ;;
--dry-run)
  [ -f "$HOST_DIR/comfyui_version.py" ] || { echo "no $HOST_DIR: run with --prepare first"; exit 1; }
  ls .whl/p*/*.whl > /dev/null || { echo "no wheels in .whl/p*: run with --prepare first"; exit 1; }
  tree=$(tree_mb); last=$(ls -d .whl/p* | sort -V | tail -1); ok=1
  for p in .whl/p*; do
    mb=$(( $(du -sm "$p" | cut -f1) + tree )); [ "$p" = "$last" ] && mb=$(( mb + $(du -sm .hosts | cut -f1) ))
    echo "call for $p would carry about $mb MiB (limit 64)"; [ "$mb" -lt 64 ] || ok=0
  done
  echo "host: $(grep __version__ "$HOST_DIR/comfyui_version.py")"
  # shellcheck disable=SC2086
  COMFYUI_PATH=$HOST_DIR IMAGIC_HOST_DEVICE=cuda "${PYTHON:-python3}" -m pytest -q --collect-only -p no:cacheprovider $TESTS | tail -1
  # --bench's code on tiny configs on this CPU (about 40 s): the same builds, stages, blocks, edit and report
  COMFYUI_PATH=$HOST_DIR OMP_NUM_THREADS=1 "${PYTHON:-python3}" benchmarks/gpu_edit.py --tiny --device cpu --blocks \
      --sizes 128,64 --embedding-steps 5 --finetune-steps 5 --sample-steps 2 --out gpu_check_out/dry_run 2>&1 \
      | grep -v 'it/s]$' | tail -4
  for m in "sd15 64" "sdxl 128"; do  # the --bench-speed rows, planned
    set -- $m
    "${PYTHON:-python3}" benchmarks/speed_memory.py --model "$1" --latent "$2" --device cuda --backend diffusers \
        --only "baseline;project defaults" --e2e --dry-run | tail -4
  done
  [ "$ok" = 1 ]; exit $? ;;
--install)
  part=${2:?which part}
  pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site "$@"; }
  if ls ".whl/$part"/*.whl > /dev/null 2>&1; then pipi ".whl/$part"/*.whl; fi
  mkdir -p .site/.chunks
  for c in ".whl/$part"/*.chunk-*; do [ -e "$c" ] && cp "$c" .site/.chunks/; done
  for first in .site/.chunks/*.chunk-01-of-*; do  # a chunked wheel whose chunks have all come: join, install
    [ -e "$first" ] || continue
    whl=${first%.chunk-01-of-*}; n=${first##*-of-}
    if [ "$(ls "$whl".chunk-*-of-"$n" | wc -l)" -eq "$((10#$n))" ]; then
      cat "$whl".chunk-*-of-"$n" > "$whl" && pipi "$whl" && rm -f "$whl" "$whl".chunk-*; echo "joined $(basename "$whl")"
    fi
  done
  echo "installed $part: $(ls ".whl/$part" | wc -l) files"
  case "${3:-}" in --run) ;; --bench) bench; exit 0 ;; *) exit 0 ;; esac ;;
--bench) bench; exit 0 ;;
--bench-speed)
  # The speed benchmark's rows on CUDA, SD1.5 at 512 px and SDXL at 1024 px with random weights:
  # per-stage s/step and peak VRAM through both backends (the host's at ComfyUI 0.33's defaults),
  # and the default edit end to end through the diffusers path (500 + 500 steps, 6 etas).
  OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
  export PYTHONPATH=$PWD/.site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
  for m in "sd15 64" "sdxl 128"; do
    set -- $m
    python3 benchmarks/speed_memory.py --model "$1" --latent "$2" --device cuda --backend diffusers \
        --only "baseline;project defaults" --warmup 2 --steps 5 --e2e --out "$OUT/gpu_$1_diffusers" 2>&1 | tail -30
    COMFYUI_PATH=$HOST_DIR python3 benchmarks/speed_memory.py --model "$1" --latent "$2" --device cuda \
        --backend host --only "project defaults" --warmup 2 --steps 5 --no-e2e --out "$OUT/gpu_$1_host" 2>&1 | tail -20
  done
  exit 0 ;;
*) echo "usage: $0 --prepare | --dry-run | --install PART [--run | --bench] | --bench | --bench-speed"; exit 2 ;;
esac

OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
set -o pipefail
# shellcheck disable=SC2086
COMFYUI_PATH=$HOST_DIR IMAGIC_HOST_DEVICE=cuda IMAGIC_REQUIRE_HOST=1 \
  python3 -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/junit.xml" $TESTS 2>&1 | tee "$OUT/pytest.log"
