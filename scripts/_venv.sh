# Sourced by scripts/*: make the project's virtualenv if needed and install the package into it.
# Usage: ensure_venv [EXTRAS]   e.g. ensure_venv test
ensure_venv() {
  local extras="${1:-}"
  VENV="${RECEIVER_VENV:-$PWD/.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    local py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "receiver needs Python 3.11 or newer (tried '$py'; set PYTHON=...)" >&2
      exit 2
    fi
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  fi
  local target="."
  [ -n "$extras" ] && target=".[$extras]"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$target" 2>&1 \
    | grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' || true
}
