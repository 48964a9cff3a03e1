#!/usr/bin/env bash
# Installs diffnnunet into ./.venv (or the active environment with DIFFNNUNET_NO_VENV=1) on a fresh machine.
# CPU by default: torch 2.13.0 (the CPU wheel), nnU-Net without timm/torchvision (see README, "Installation").
# Bring your own torch: TORCH_SPEC="torch==2.x.y" bash scripts/install.sh, or install torch first and set
# TORCH_SPEC="" to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${DIFFNNUNET_NO_VENV:-0}" != "1" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install --quiet --upgrade pip
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
if [ -n "$TORCH_SPEC" ]; then python -m pip install --quiet "$TORCH_SPEC"; fi
python -m pip install --quiet --no-deps "nnunetv2==2.8.1" "dynamic-network-architectures==0.4.4"
python -m pip install --quiet -e ".[demo,test]" connected-components-3d
python -c "import torch, nnunetv2, diffnnunet; print('diffnnunet', diffnnunet.__version__, 'torch', torch.__version__)"
