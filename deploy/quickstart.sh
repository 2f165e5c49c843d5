#!/usr/bin/env bash
# fedmq quick start: install everything, run the demo, or run the checks CI runs.
#
#   deploy/quickstart.sh setup               system packages + .venv + pip install (+ .venv-amqtt)
#   deploy/quickstart.sh demo [ARGS...]      setup, then a 10-client Fashion-MNIST demo
#   deploy/quickstart.sh example [ARGS...]   setup, then the sensor plugin example
#                                            (docs/custom-models.md)
#   deploy/quickstart.sh test [PYTEST_ARGS]  setup, then ruff, mypy and pytest
#
# Environment:
#   FEDMQ_VENV    virtualenv path (default: <repo>/.venv)
#   FEDMQ_PYTHON  interpreter used to create the venv (default: python3, must be >= 3.11)
#   FEDMQ_AMQTT_VENV  virtualenv of the MQTT 3.1.1 test broker (default: <repo>/.venv-amqtt)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDMQ_VENV:-$REPO_ROOT/.venv}"
PYTHON="${FEDMQ_PYTHON:-python3}"
CONSTRAINTS="$REPO_ROOT/deploy/constraints-ci.txt"
AMQTT_VENV="${FEDMQ_AMQTT_VENV:-$REPO_ROOT/.venv-amqtt}"
AMQTT_CONSTRAINTS="$REPO_ROOT/deploy/constraints-amqtt.txt"
APT_PACKAGES=(mosquitto mosquitto-clients dataset-fashion-mnist)
FMNIST_DIR=/usr/share/datasets/fashion-mnist
LINT_PATHS=(shared aggregator edge_agent tests docs/examples)
EXAMPLE_DIR=docs/examples/sensor-cnn

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<'EOF'
usage: deploy/quickstart.sh COMMAND [ARGS...]

commands:
  setup               install system packages (mosquitto, mosquitto-clients,
                      dataset-fashion-mnist) if missing, create the virtualenv if
                      missing, and pip-install fedmq with its train, sensors, dp and dev
                      extras, and the sensor example's plugin package with its data
                      extra (sktime, whose files hold the example's datasets);
                      create .venv-amqtt (amqtt, the MQTT 3.1.1 test broker) if missing
  demo [ARGS...]      setup, then: fedmq demo --clients 10 --rounds 20
                      --dataset fashion-mnist --partition dirichlet --alpha 0.5 ARGS...
  example [ARGS...]   setup, then the sensor example: a federation of a plugin 1-D CNN
                      on real sensor recordings over a local Mosquitto, beside
                      centralised training (fedmq-sensor-example ARGS...; --help)
  test [PYTEST_ARGS]  setup, then ruff check, ruff format --check, mypy, the layering
                      contract (lint-imports) and pytest;
                      exits non-zero if any of them fails (pytest's exit code wins)

environment:
  FEDMQ_VENV    virtualenv path (default: <repo>/.venv)
  FEDMQ_PYTHON  Python used to create the virtualenv (default: python3, >= 3.11)
  FEDMQ_AMQTT_VENV  virtualenv of the MQTT 3.1.1 test broker (default: <repo>/.venv-amqtt)
EOF
}

have_mosquitto() {
    # Debian puts the broker in /usr/sbin, which is not on an ordinary user's PATH.
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]
}

ensure_system_packages() {
    if have_mosquitto && command -v mosquitto_sub >/dev/null 2>&1 && [ -d "$FMNIST_DIR" ]; then
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            die "missing system packages and not root (no sudo): run as root: apt-get install ${APT_PACKAGES[*]}"
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        # Not Debian-like: we cannot install them, but a broker from elsewhere (Homebrew,
        # FEDMQ_MOSQUITTO) still works, so warn instead of refusing to set up Python.
        log "WARNING: apt-get not found; install mosquitto and the Fashion-MNIST data yourself"
        return 0
    fi
    log "installing system packages: ${APT_PACKAGES[*]}"
    # Not starting the system mosquitto service: the demo and the tests start their own
    # broker on a free loopback port.
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
}

check_python() {
    # $1: interpreter. Prints its version; fails unless it is >= 3.11.
    local py="$1" version
    version="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
        || die "cannot run '$py'; install Python >= 3.11 or set FEDMQ_PYTHON"
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "fedmq needs Python >= 3.11, but '$py' is Python $version (set FEDMQ_PYTHON)"
    printf '%s' "$version"
}

ensure_venv() {
    if [ -x "$VENV/bin/python" ]; then
        check_python "$VENV/bin/python" >/dev/null
        return 0
    fi
    command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; install Python >= 3.11"
    local version
    version="$(check_python "$PYTHON")"
    log "creating virtualenv $VENV (Python $version)"
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (Debian: apt-get install python3-venv)"
}

torch_pins() {
    # The torch/torchvision pair per CPU: x86_64 takes the release this project's machines
    # hold on local disk, aarch64 (Raspberry Pi 4/5) takes CPU-only arm64 wheels. Other
    # architectures get whatever pip resolves from pyproject's ranges.
    case "$(uname -m)" in
        x86_64) echo "torch==2.14.1 torchvision==0.29.1" ;;
        aarch64 | arm64) echo "torch==2.9.1 torchvision==0.24.1" ;;
        *) echo "torch torchvision" ;;
    esac
}

ensure_torch() {
    local pins spec name want have missing=()
    pins="$(torch_pins)"
    for spec in $pins; do
        name="${spec%%==*}"
        want="${spec#*==}"
        [ "$want" = "$spec" ] && want=""
        # Asking importlib.metadata is instant, while `pip install torch==X` re-resolves
        # torch's whole dependency tree (several seconds) even when nothing changes.
        have="$("$VENV/bin/python" -c 'import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass' "$name")"
        if [ -z "$have" ] || { [ -n "$want" ] && [ "${have%%+*}" != "$want" ]; }; then
            missing+=("$spec")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing $pins"
        # shellcheck disable=SC2086  # $pins is a list of requirement specifiers
        "$VENV/bin/python" -m pip install $pins
    fi
}

ensure_amqtt() {
    # amqtt, a pure-Python MQTT 3.1.1-only broker, runs the 3.1.1 integration tests
    # (tests/integration/test_mqtt311.py). Its dependencies conflict with fedmq's, so it gets a
    # virtualenv of its own, made once (about 10 s) and re-made only when the pin changes.
    local want have
    want="$(sed -n 's/^amqtt==//p' "$AMQTT_CONSTRAINTS")"
    have="$("$AMQTT_VENV/bin/python" -c 'from importlib.metadata import version
print(version("amqtt"))' 2>/dev/null || true)"
    if [ -x "$AMQTT_VENV/bin/amqtt" ] && [ "$have" = "$want" ]; then
        return 0
    fi
    log "creating $AMQTT_VENV: amqtt $want (the MQTT 3.1.1 test broker)"
    # A failure here must not stop the other checks: without amqtt its tests are skipped
    # locally and fail under CI=true (tests/integration/test_mqtt311.py), naming the cause.
    if ! { "$VENV/bin/python" -m venv --clear "$AMQTT_VENV" \
        && "$AMQTT_VENV/bin/python" -m pip install --quiet -c "$AMQTT_CONSTRAINTS" "amqtt==$want"; }
    then
        log "WARNING: could not install amqtt into $AMQTT_VENV; the MQTT 3.1.1 tests cannot run"
    fi
}

cmd_setup() {
    ensure_system_packages
    ensure_venv
    log "upgrading pip in $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    ensure_torch
    log "installing fedmq (editable) with extras train,sensors,dp,dev, and $EXAMPLE_DIR[data]"
    (cd "$REPO_ROOT" && "$VENV/bin/python" -m pip install --quiet \
        -c "$CONSTRAINTS" -e '.[train,sensors,dp,dev]' -e "$EXAMPLE_DIR[data]")
    ensure_amqtt
    log "setup complete: $VENV"
}

cmd_demo() {
    cmd_setup
    cd "$REPO_ROOT"
    exec "$VENV/bin/fedmq" demo --clients 10 --rounds 20 --dataset fashion-mnist \
        --partition dirichlet --alpha 0.5 "$@"
}

cmd_example() {
    cmd_setup
    cd "$REPO_ROOT"
    exec "$VENV/bin/fedmq-sensor-example" "$@"
}

cmd_test() {
    cmd_setup
    cd "$REPO_ROOT"
    # Run every check even when an earlier one fails, so one CI log shows all problems;
    # the exit status still reports any failure.
    local failed=0 rc=0
    log "ruff check"
    "$VENV/bin/ruff" check "${LINT_PATHS[@]}" || failed=1
    log "ruff format --check"
    "$VENV/bin/ruff" format --check "${LINT_PATHS[@]}" || failed=1
    log "mypy"
    "$VENV/bin/mypy" || failed=1
    log "layering contract (lint-imports, contracts in pyproject.toml)"
    "$VENV/bin/lint-imports" --no-cache || failed=1
    log "pytest"
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        exit "$rc"
    fi
    if [ "$failed" -ne 0 ]; then
        log "tests passed but lint/type checks failed (see above)"
        exit 1
    fi
}

main() {
    local command="${1:-}"
    [ "$#" -gt 0 ] && shift
    case "$command" in
        setup) cmd_setup "$@" ;;
        demo) cmd_demo "$@" ;;
        example) cmd_example "$@" ;;
        test) cmd_test "$@" ;;
        -h | --help | help) usage ;;
        "") usage >&2; exit 2 ;;
        *) printf 'unknown command: %s\n\n' "$command" >&2; usage >&2; exit 2 ;;
    esac
}

main "$@"
