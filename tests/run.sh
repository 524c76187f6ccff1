#!/usr/bin/env bash
# Install LoRA Studio and run its tests.
#
#   bash tests/run.sh [PYTEST ARGS]   the locked versions (requirements.lock) into .venv, then the whole suite
#   bash tests/run.sh --fresh [...]   the same in a .venv made from nothing, without pip's cache (CI does this)
#   bash tests/run.sh --latest        the newest versions pyproject's ranges allow, in a new .venv-latest:
#                                     prints what differs from the lock, then runs the smoke tests
#   bash tests/run.sh --lock          refresh the lock: resolve the newest allowed versions for every target
#                                     (tests/write_lock.py --upgrade, uv's universal resolver), install them in a
#                                     new .venv-lock, run the whole suite, and only if it passes replace requirements.lock
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
elif [ "$mode" = lock ]; then
  [ -x .venv/bin/python ] || { echo "tests/run.sh --lock: run bash tests/run.sh first (uv comes with the test extra)"; exit 1; }
  candidate=$(mktemp requirements.lock.XXXXXX)
  trap 'rm -f "$candidate"' EXIT
  cp requirements.lock "$candidate"
  PATH="$PWD/.venv/bin:$PATH" .venv/bin/python tests/write_lock.py --upgrade --out "$candidate"
  constraints=(-c "$candidate")
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
    diff <(grep '==' requirements.lock | sed 's/ *;.*//' | sort -fu) <(freeze) | grep '^>' || echo "  (nothing: the lock is the newest)"
    exec "$venv/bin/python" -m pytest -m smoke "$@" ;;
  lock)
    "$venv/bin/python" -m pytest "$@"
    chmod 644 "$candidate" && mv "$candidate" requirements.lock
    echo "tests/run.sh: wrote requirements.lock; review 'git diff requirements.lock' and commit it" ;;
esac
