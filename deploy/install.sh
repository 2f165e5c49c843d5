#!/usr/bin/env bash
# Install (or upgrade in place) fedmq on a Raspberry Pi OS / Debian device or server.
#
#   sudo deploy/install.sh --broker mqtt://10.0.0.2:1883 --federation shop-floor \
#        --client-id pi-07 --data /var/lib/fedmq/data.npz          # training agent
#   sudo deploy/install.sh --inference-only --broker ... --client-id pi-07   # ONNX only
#   sudo deploy/install.sh --role aggregator --broker mqtt://127.0.0.1:1883
#   sudo deploy/install.sh ... --extra-package ./my-model-plugin    # + your own packages
#
# Creates a venv under PREFIX (/opt/fedmq), installs the torch wheel that fits the platform
# (x86_64: torch 2.14.1 / torchvision 0.29.1; aarch64: torch 2.9.1 / torchvision 0.24.1) or
# only onnxruntime (--inference-only), with every --extra-package (e.g. a model plugin) in
# the same pip run, writes /etc/fedmq/<role>.toml when missing (never overwrites an
# operator's edits), installs the systemd unit and enables it when systemd runs.
# --root DIR installs below DIR (packaging, tests) and implies --no-enable.
set -euo pipefail

SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/fedmq
ROOT=""
ROLE=agent
INFERENCE_ONLY=0
ENABLE=1
PYTHON="${FEDMQ_PYTHON:-python3}"
BROKER="mqtt://127.0.0.1:1883"
FEDERATION=default
CLIENT_ID="$(hostname -s 2>/dev/null || echo device)"
DATA=/var/lib/fedmq/data.npz
read -r -a PIP_ARGS <<< "${FEDMQ_PIP_ARGS:-}"
EXTRA_PACKAGES=()

# A local file or directory (a plugin's source, a wheel) by its absolute path, so that pip
# reads it wherever this script runs from; anything else is a requirement for pip's index.
package_spec() {
    if [ -e "$1" ]; then
        realpath "$1"
    else
        printf '%s\n' "$1"
    fi
}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<'EOF2'
options:
  --role agent|aggregator   what this machine runs (default agent)
  --inference-only          agent that only serves predictions (onnxruntime, no torch)
  --prefix DIR              install directory (default /opt/fedmq)
  --root DIR                install below DIR instead of / (implies --no-enable)
  --no-enable               install the unit but do not run systemctl
  --python PY               interpreter for the venv (>= 3.11; default python3)
  --broker URL --federation NAME --client-id ID --data PATH
                            written to the config file when it does not exist yet
  --extra-package PKG       also pip-install PKG into the venv (repeatable): a model
                            plugin's directory or wheel, or a requirement (name[==version]);
                            the aggregator and every training device need the same plugin
environment: FEDMQ_PIP_ARGS  extra pip arguments (e.g. --index-url, --find-links)
EOF2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --role) ROLE="$2"; shift ;;
        --inference-only) INFERENCE_ONLY=1 ;;
        --prefix) PREFIX="$2"; shift ;;
        --root) ROOT="${2%/}"; ENABLE=0; shift ;;
        --no-enable) ENABLE=0 ;;
        --python) PYTHON="$2"; shift ;;
        --broker) BROKER="$2"; shift ;;
        --federation) FEDERATION="$2"; shift ;;
        --client-id) CLIENT_ID="$2"; shift ;;
        --data) DATA="$2"; shift ;;
        --source) SOURCE="$2"; shift ;;
        --extra-package) EXTRA_PACKAGES+=("$(package_spec "$2")"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done
case "$ROLE" in agent|aggregator) ;; *) die "--role must be agent or aggregator" ;; esac
[ "$ROLE" = aggregator ] && [ "$INFERENCE_ONLY" = 1 ] && die "the aggregator needs torch"

VENV="$ROOT$PREFIX/venv"
ETC="$ROOT/etc/fedmq"
UNIT_DIR="$ROOT/etc/systemd/system"

torch_pins() {
    case "$(uname -m)" in
        x86_64|amd64) echo "torch==2.14.1 torchvision==0.29.1" ;;
        aarch64|arm64) echo "torch==2.9.1 torchvision==0.24.1" ;;
        *) die "no torch wheel known for $(uname -m); use --inference-only" ;;
    esac
}

make_user() {
    if [ -n "$ROOT" ] || id fedmq >/dev/null 2>&1; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "run as root to create the fedmq user (or use --root)"
    log "creating system user fedmq"
    useradd --system --home-dir /var/lib/fedmq --no-create-home --shell /usr/sbin/nologin fedmq
}

install_python() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "fedmq needs Python >= 3.11 ($PYTHON is older; apt-get install python3)"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV"
    fi
    local extra=train
    local pins=()
    if [ "$INFERENCE_ONLY" = 1 ]; then
        extra=inference
    else
        read -r -a pins <<< "$(torch_pins)"
    fi
    log "installing fedmq[$extra] ${pins[*]:-} ${EXTRA_PACKAGES[*]:-} into $VENV (upgrades in place)"
    # One resolver run: a plugin requiring fedmq is satisfied by this source, not the index.
    "$VENV/bin/python" -m pip install --quiet --upgrade "${PIP_ARGS[@]}" "${pins[@]}" \
        "$SOURCE[$extra]" "${EXTRA_PACKAGES[@]}"
}

write_config() {
    mkdir -p "$ETC"
    local file="$ETC/$ROLE.toml"
    if [ -e "$file" ]; then
        log "keeping existing $file"
        return 0
    fi
    log "writing $file"
    if [ "$ROLE" = aggregator ]; then
        cat > "$file" <<EOF2
# fedmq aggregator settings (every key: docs/configuration.md). FEDMQ_AGGREGATOR_* wins.
[aggregator]
broker = "$BROKER"
federation = "$FEDERATION"
metrics_file = "/var/lib/fedmq/metrics.json"
state_dir = "/var/lib/fedmq"
EOF2
    else
        cat > "$file" <<EOF2
# fedmq device settings (every key: docs/configuration.md). FEDMQ_AGENT_* wins.
[agent]
broker = "$BROKER"
federation = "$FEDERATION"
client_id = "$CLIENT_ID"
data = "$DATA"

# fedmq-agent serve (on-device inference). FEDMQ_INFERENCE_* wins.
[inference]
broker = "$BROKER"
federation = "$FEDERATION"
client_id = "$CLIENT_ID"
EOF2
    fi
    chmod 0644 "$file"
}

unit_name() {
    if [ "$ROLE" = aggregator ]; then echo fedmq-aggregator.service
    elif [ "$INFERENCE_ONLY" = 1 ]; then echo fedmq-inference.service
    else echo fedmq-agent.service; fi
}

install_unit() {
    local unit
    unit="$(unit_name)"
    mkdir -p "$UNIT_DIR"
    install -m 0644 "$SOURCE/README.md" "$ROOT$PREFIX/README.md"   # the units' Documentation=
    sed "s|/opt/fedmq|$PREFIX|g" "$SOURCE/deploy/$unit" > "$UNIT_DIR/$unit"
    log "installed $UNIT_DIR/$unit"
    if [ "$ENABLE" = 0 ]; then
        log "not enabling $unit (--no-enable/--root)"
    elif [ ! -d /run/systemd/system ]; then
        log "systemd is not running here: start $unit yourself"
    else
        systemctl daemon-reload
        systemctl enable "$unit"
        systemctl restart "$unit"   # a re-run picks up the upgraded code
        log "enabled and (re)started $unit"
    fi
}

smoke_test() {
    if [ "$INFERENCE_ONLY" = 1 ]; then
        "$VENV/bin/python" -c 'import sys, edge_agent.inference; sys.exit("torch" in sys.modules)'
        "$VENV/bin/fedmq-agent" predict --help >/dev/null
    elif [ "$ROLE" = aggregator ]; then
        "$VENV/bin/fedmq-aggregator" --help >/dev/null
    else
        "$VENV/bin/fedmq-agent" --help >/dev/null
    fi
    local plugins
    plugins="$("$VENV/bin/python" -c 'from importlib.metadata import entry_points
print(", ".join(sorted(ep.name for ep in entry_points(group="fedmq.models"))))')"
    [ -n "$plugins" ] && log "model plugins installed: $plugins"
    log "fedmq is installed in $VENV"
}

make_user
install_python
write_config
install_unit
smoke_test
