# Sourced by scripts/*: make the project's virtualenv if needed and install the package into it.
# Usage: ensure_venv [EXTRAS]   e.g. ensure_venv test
#
# The install runs only when the venv is new or pyproject.toml changed since the last install (or more
# extras are wanted than were installed): a stamp in the venv records what was installed. pip's own
# output goes to .venv/install.log, shown only if the install fails.
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
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >"$VENV/install.log" 2>&1 \
      || echo "receiver: could not upgrade pip in $VENV (going on with its own; see $VENV/install.log)" >&2
    rm -f "$VENV/.receiver-installed"
  fi
  local stamp="$VENV/.receiver-installed"
  local project
  project="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ -f "$stamp" ]; then
    local done_project done_extras
    read -r done_project done_extras <"$stamp" || true
    # Installed for this pyproject.toml with these extras (a test install serves `serve` too).
    if [ "$done_project" = "$project" ] && { [ -z "$extras" ] || [ "${done_extras:-}" = "$extras" ]; }; then
      return 0
    fi
  fi
  local target="."
  [ -n "$extras" ] && target=".[$extras]"
  echo "installing receiver${extras:+ with [$extras]} into $VENV (once; again when pyproject.toml changes)" >&2
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$target" \
      >"$VENV/install.log" 2>&1; then
    tail -n 30 "$VENV/install.log" >&2
    echo "receiver: installing into $VENV failed (the whole log: $VENV/install.log)" >&2
    exit 2
  fi
  echo "$project ${extras}" >"$stamp"
}
