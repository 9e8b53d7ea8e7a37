#!/usr/bin/env bash
# Test the open_clip scorer for real, in its own venv.
#
# open_clip needs torchvision, whose wheels pin a torch release other than the project's, so
# the [open_clip] extra (open_clip_torch, torchvision) lives outside the main environment.
# This script creates the venv once (VENV, default /tmp/venv-openclip), installs pairforge
# into it without dependencies, and runs the open_clip tests of tests/test_models_clip.py
# (a randomly initialised small open_clip model saved to a local checkpoint and loaded
# through an ``open_clip:ARCH/PATH`` spec; no download).
#
#   bash scripts/test_open_clip_env.sh            # create (if missing) and test
#   VENV=/tmp/other bash scripts/test_open_clip_env.sh
set -euo pipefail

VENV="${VENV:-/tmp/venv-openclip}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import open_clip, torchvision" 2>/dev/null; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 open_clip_torch pillow numpy \
    transformers datasets pyarrow tokenizers huggingface_hub tqdm rich pytest
fi
"$VENV/bin/pip" install -q -e "$ROOT" --no-deps
"$VENV/bin/python" -c "import torch, torchvision, open_clip; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| open_clip', open_clip.__version__)"
cd "$ROOT"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_models_clip.py -k open_clip -rs "$@"
