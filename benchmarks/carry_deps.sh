#!/usr/bin/env bash
# Copy the pure-Python packages that train.py needs and a bare GPU machine lacks (Hydra,
# OmegaConf, the ANTLR runtime they parse with) from a virtual environment into .carry/
# (git-ignored), so that `PYTHONPATH=.:.carry` finds them there. Usage, from the repo root:
#   bash benchmarks/carry_deps.sh [VENV]        # VENV: default /work/main/.venv, else .venv
set -euo pipefail
venv=${1:-}
if [[ -z $venv ]]; then
  for candidate in /work/main/.venv .venv; do
    [[ -d $candidate ]] && venv=$candidate && break
  done
fi
site=$(ls -d "$venv"/lib/python3*/site-packages 2>/dev/null | head -1)
[[ -n $site ]] || { echo "no site-packages under ${venv:-<none>}; pass the venv" >&2; exit 1; }
dest=.carry
rm -rf "$dest" && mkdir -p "$dest"
for package in hydra omegaconf antlr4; do
  [[ -d $site/$package ]] || { echo "$package is not installed in $venv" >&2; exit 1; }
  cp -r "$site/$package" "$dest/"
done
# Their metadata, for importlib.metadata (Hydra reads its own version from it).
cp -r "$site"/hydra_core-*.dist-info "$site"/omegaconf-*.dist-info \
  "$site"/antlr4_python3_runtime-*.dist-info "$dest/"
find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
du -sh "$dest" | awk '{print "copied hydra, omegaconf, antlr4 into .carry/ (" $1 ")"}'
