#!/usr/bin/env bash
# Set up .venv, then run the main job on the embedded default (tiny model built locally, bundled data).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec .venv/bin/python -m tools.demo "$@"
