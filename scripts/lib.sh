# Shared by the scripts: the cache, the toolchain's prerequisites, the release build.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export BILLING_HOME=${BILLING_HOME:-$HOME/.cache/billing}
# One target dir across clones and CI runs on this machine: the dependencies build once.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$BILLING_HOME/target}
BIN=$CARGO_TARGET_DIR/release
mkdir -p "$BILLING_HOME"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Debian packages the build and the stack need (PostgreSQL itself is installed by
# `billing stack up` when missing).
install_prerequisites() {
  local missing=()
  for pkg in pkg-config libssl-dev zlib1g-dev libpq-dev make g++; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  fi
}

# Headless Chromium and its driver for the console's browser tests (Debian's packages; a test
# tool's own browser download cannot work here), and a Korean font so pages render names.
install_browser() {
  local missing=()
  for pkg in chromium chromium-driver fonts-nanum; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  fi
}

build_release() {
  log "building the workspace (release)"
  (cd "$ROOT" && cargo build --release --workspace --bins)
}

stack_up() {
  log "starting the local stack"
  local exports
  exports=$("$BIN/billing" stack up)
  eval "$exports"
  export DATABASE_URL KAFKA_BROKERS SCHEMA_REGISTRY_URL BILLING_TZ
}
