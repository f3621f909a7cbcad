#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md in one script (about 6-8 minutes on one H200).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]        # default: $OUT, else outputs/gpu
#
# For a machine without diffusers (and without internet): put its wheel in .whl/ (`pip download --no-deps
# diffusers==0.42.1 importlib_metadata zipp Pillow -d .whl`); the script installs from there when needed.
# Each stage writes its own folder as soon as it finishes, so a run cut short keeps what it measured.
# STAGES (default "step index compile") picks stages: step = the three bench_step runs.
set -uo pipefail
out="${1:-${OUT:-outputs/gpu}}"
mkdir -p "$out"
log="$out/gpu_check.log"
exec > >(tee -a "$log") 2>&1

stage() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }

stages="${STAGES:-step index compile}"
want() { [[ " $stages " == *" $1 "* ]]; }

stage "environment"
if ! python -c "import diffusers" 2>/dev/null; then
    python -m pip install --no-deps --no-index -q .whl/diffusers-*.whl .whl/importlib_metadata-*.whl .whl/zipp-*.whl
    python -c "import PIL" 2>/dev/null || python -m pip install --no-deps --no-index -q --find-links .whl Pillow
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

# SD1.5-sized training step, batch 8, 512 px, bf16: the trainer's vanilla and PoGDiff steps (PoGDiff with its
# default CUDA-graph neighbour forward and with the eager one) next to diffusers' own train_text_to_image.py
# step, interleaved in one process.
if want step; then
    stage "sd15 full fine-tune, nothing skippable"
    python benchmarks/bench_step.py --preset sd15 --batch_size 8 --steps 20 --warmup 3 \
        --methods diffusers,vanilla,pogdiff,pogdiff-eager --skippable_fraction 0 --output_dir "$out/sd15-full-f0"

    stage "sd15 full fine-tune, half skippable, all objectives"
    python benchmarks/bench_step.py --preset sd15 --batch_size 8 --steps 15 --warmup 3 \
        --methods vanilla,pogdiff,pogdiff-eager,cbdm,t2h --skippable_fraction 0.5 --output_dir "$out/sd15-full-f05"

    stage "sd15 LoRA, nothing skippable"
    python benchmarks/bench_step.py --preset sd15 --batch_size 8 --steps 20 --warmup 3 --lora \
        --methods diffusers,vanilla,pogdiff,pogdiff-eager --skippable_fraction 0 --output_dir "$out/sd15-lora-f0"
fi

if want index; then
    stage "index build on the GPU: k-NN 100k and 1M x 768, text density 100k"
    python benchmarks/bench_index.py --device cuda --sizes 100000,1000000 --density_sizes 100000 \
        --output_dir "$out/index-cuda"
fi

# Last, as it compiles for minutes: the same step under torch.compile (accelerate's --dynamo_backend inductor).
if want compile; then
    stage "sd15 full fine-tune under torch.compile"
    timeout "${COMPILE_TIMEOUT:-240}" python benchmarks/bench_step.py --preset sd15 --batch_size 8 --steps 10 \
        --warmup 3 --torch_compile --methods vanilla,pogdiff --skippable_fraction 0 \
        --output_dir "$out/sd15-compile-f0"
fi

stage "done"
