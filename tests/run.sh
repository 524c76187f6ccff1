#!/usr/bin/env bash
# Install LoRA Studio and run its tests.
#
#   bash tests/run.sh [PYTEST ARGS]   the locked versions (requirements.lock) into .venv, then the whole suite
#   bash tests/run.sh --fresh [...]   the same in a .venv made from nothing, without pip's cache (CI does this)
#   bash tests/run.sh --latest        the newest versions pyproject's ranges allow, in a new .venv-latest:
#                                     prints what differs from the lock, then runs the smoke tests
#   bash tests/run.sh --lock          refresh the lock: resolve the newest allowed versions in a new .venv-lock,
#                                     run the whole suite, and only if it passes write requirements.lock
#
# torch 2.13.0 is always installed first and named exactly: a bare range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=locked venv=.venv fresh=0
case "${1:-}" in
  --fresh) fresh=1; shift ;;
  --latest) mode=latest venv=.venv-latest fresh=1; shift ;;
  --lock) mode=lock venv=.venv-lock fresh=1; shift ;;
esac

pip_opts=(-q)
constraints=()
if [ "$mode" = locked ]; then
  constraints=(-c requirements.lock)
fi
if [ "$fresh" = 1 ]; then
  echo "tests/run.sh: making $venv from nothing (mode: $mode)"
  rm -rf "$venv"
  pip_opts+=(--no-cache-dir)
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install "${pip_opts[@]}" "${constraints[@]}" --upgrade pip
"${pip[@]}" install "${pip_opts[@]}" "${constraints[@]}" "torch==2.13.0"
"${pip[@]}" install "${pip_opts[@]}" "${constraints[@]}" -e ".[test]"
[ "$mode" = locked ] && echo "tests/run.sh: installed from requirements.lock ($(grep -c '==' requirements.lock) pins)"
"$venv/bin/python" -m trainer doctor || true  # the versions and device in every log; findings fail tests, not this

freeze() {  # the installed set as pins, in the lock's form (no local build tags such as +cpu, no project)
  "${pip[@]}" freeze --all --exclude-editable | grep -v '^lora-studio' | sed -E 's/^([^=]+==[^+]+)\+.*/\1/' | sort -f
}

case "$mode" in
  locked)
    exec "$venv/bin/python" -m pytest "$@" ;;
  latest)
    echo "tests/run.sh: newer than requirements.lock:"
    diff <(grep '==' requirements.lock | sort -f) <(freeze) | grep '^>' || echo "  (nothing: the lock is the newest)"
    exec "$venv/bin/python" -m pytest -m smoke "$@" ;;
  lock)
    "$venv/bin/python" -m pytest "$@"
    tmp=$(mktemp requirements.lock.XXXXXX)
    {
      echo "# LoRA Studio's tested versions, as pip constraints: pip install -c requirements.lock ..."
      echo "# Written by 'bash tests/run.sh --lock' on $(date -u +%F) with Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())') after the whole suite passed."
      freeze
    } > "$tmp"
    chmod 644 "$tmp" && mv "$tmp" requirements.lock
    echo "tests/run.sh: wrote requirements.lock; review 'git diff requirements.lock' and commit it" ;;
esac
