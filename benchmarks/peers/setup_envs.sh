#!/usr/bin/env bash
# Create (idempotently) one virtualenv per peer library under <repo>/.peers/ and install the peer
# with pinned versions.  Peers get their own environments because pcx pins jax 0.4.x (jax<0.5) and
# equinox<0.12, which must not leak into pcfast's environment.
#
#   bash benchmarks/peers/setup_envs.sh            # both peers
#   bash benchmarks/peers/setup_envs.sh pcx        # only one
#   PYTHON=python3.11 bash benchmarks/peers/setup_envs.sh
#
# Re-running is cheap: an existing venv is reused and pip only checks the pins.
# Each env's full `pip freeze` is written to .peers/<name>.freeze.txt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="$ROOT/.peers"
PY="${PYTHON:-python3}"

# Pins (verified together on Python 3.11, x86-64 Linux, CPU):
PCX_PINS=(
  "pcx==0.6.3"            # requires jax>=0.4.33,<0.5, equinox>=0.11.7,<0.12, optax>=0.2.3,<0.3
  "jax==0.4.38" "jaxlib==0.4.38"
  "equinox==0.11.12" "optax==0.2.5" "chex==0.1.90" "jaxtyping==0.3.11"
  "numpy==2.4.6"
)
PYDEEPITY_PINS=(
  "pydeepity==0.1.0a3"    # manylinux_2_28 x86-64 wheel; bundles OpenBLAS (OpenMP build) + libgomp
  "numpy==2.4.6" "rich==15.0.0"
)

make_env() {  # name check-python pins...
  local name="$1" check="$2"; shift 2
  local env="$PEERS/$name"
  mkdir -p "$PEERS"
  if [[ ! -x "$env/bin/python" ]]; then
    echo "[setup_envs] creating $env" >&2
    "$PY" -m venv "$env"
  fi
  if "$env/bin/python" -c "$check" >/dev/null 2>&1; then
    echo "[setup_envs] $name: pins already satisfied" >&2
  else
    echo "[setup_envs] $name: installing $*" >&2
    "$env/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
    "$env/bin/python" -c "$check"
  fi
  "$env/bin/python" -m pip freeze --disable-pip-version-check > "$PEERS/$name.freeze.txt"
  echo "[setup_envs] $name: $("$env/bin/python" -c "$check")" >&2
}

TARGETS=("$@")
sel() { [[ ${#TARGETS[@]} -eq 0 ]] && return 0; local t; for t in "${TARGETS[@]}"; do [[ "$t" == "$1" ]] && return 0; done; return 1; }

if sel pcx; then
  make_env pcx '
from importlib.metadata import version as v
want = {"pcx": "0.6.3", "jax": "0.4.38", "jaxlib": "0.4.38", "equinox": "0.11.12", "optax": "0.2.5", "numpy": "2.4.6"}
got = {k: v(k) for k in want}
assert got == want, got
import jax, pcx, pcx.predictive_coding, pcx.nn, pcx.utils, pcx.functional
print(" ".join(f"{k}=={x}" for k, x in got.items()))
' "${PCX_PINS[@]}"
fi

if sel pydeepity; then
  make_env pydeepity '
from importlib.metadata import version as v
want = {"pydeepity": "0.1.0a3", "numpy": "2.4.6"}
got = {k: v(k) for k in want}
assert got == want, got
import deepity
deepity.SimplePCN
print(" ".join(f"{k}=={x}" for k, x in got.items()))
' "${PYDEEPITY_PINS[@]}"
fi
