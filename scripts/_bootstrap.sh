#!/usr/bin/env bash
# Shared environment bootstrap, sourced by scripts/test.sh and scripts/train_llm2clip.sh.
#
# Uses the active environment when it already has llm2clip's dependencies; otherwise creates
# .venv. Installs are idempotent: a stamp keyed on pyproject.toml's hash skips pip when nothing
# changed, so a rerun starts in seconds.
set -euo pipefail

LLM2CLIP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

_env_is_usable() {  # $1: python executable
  "$1" - <<'PY' 2>/dev/null
import importlib.util, sys
need = ["torch", "transformers", "peft", "webdataset", "omegaconf", "tokenizers", "pytest"]
sys.exit(0 if all(importlib.util.find_spec(m) for m in need) else 1)
PY
}

if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]] && _env_is_usable "$PY"; then
  ENV_PY="$(command -v "$PY")"
  STAMP_DIR="${VIRTUAL_ENV:-${CONDA_PREFIX}}"
else
  if [[ ! -x "$LLM2CLIP_ROOT/.venv/bin/python" ]]; then
    echo "[bootstrap] creating $LLM2CLIP_ROOT/.venv"
    "$PY" -m venv "$LLM2CLIP_ROOT/.venv"
  fi
  ENV_PY="$LLM2CLIP_ROOT/.venv/bin/python"
  STAMP_DIR="$LLM2CLIP_ROOT/.venv"
fi

_want="$(cat "$LLM2CLIP_ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
_stamp="$STAMP_DIR/.llm2clip-install-stamp"
if [[ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]] || ! _env_is_usable "$ENV_PY"; then
  echo "[bootstrap] installing llm2clip and its dependencies into $STAMP_DIR"
  _t0=$SECONDS
  "$ENV_PY" -m pip install --quiet --upgrade pip
  # torch first and pinned: a bare `torch` requirement resolves to a multi-GB CUDA build,
  # torch==2.13.0 is the CPU build on this machine's disk.
  if ! "$ENV_PY" -c "import torch" 2>/dev/null; then
    "$ENV_PY" -m pip install --quiet "torch==${LLM2CLIP_TORCH_VERSION:-2.13.0}"
  fi
  # DeepSpeed compiles nothing with DS_BUILD_OPS=0; its ops are JIT-built on GPU machines.
  DS_BUILD_OPS=0 "$ENV_PY" -m pip install --quiet "deepspeed>=0.16"
  "$ENV_PY" -m pip install --quiet -e "$LLM2CLIP_ROOT[dev]"
  echo "$_want" > "$_stamp"
  echo "[bootstrap] install took $((SECONDS - _t0)) s"
fi

export LLM2CLIP_PY="$ENV_PY"
export PATH="$(dirname "$ENV_PY"):$PATH"
