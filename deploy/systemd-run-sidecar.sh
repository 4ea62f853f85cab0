#!/usr/bin/env bash
# A per-host sidecar without installing a unit: runs the bridge as a
# transient systemd service (systemd-run) supervised like
# deploy/opencode-nats-bridge.service: Type=notify (READY / WATCHDOG /
# STOPPING), restarted on failure but not for a bad config (exit 78), a
# stop timeout above the shutdown grace, NATS credentials as a systemd
# credential, the unit removed once it stopped.
#
#   deploy/systemd-run-sidecar.sh [options] [-- extra `run` arguments]
#
#   --user          under your user manager (no root); `loginctl enable-linger`
#                   keeps it running after you log out
#   --name NAME     unit name (default: opencode-nats-bridge-sidecar)
#   --config FILE   the daemon's config file (default: embedded defaults + environment)
#   --dir DIR       the project OpenCode works in (default: the current directory)
#   --nats URL      NATS server URL(s) (OPENCODE_BRIDGE__NATS__URL)
#   --creds FILE    a NATS .creds file, handed over as a systemd credential
#   --as USER       (system manager) run as this user instead of root
#   --bin PATH      the opencode-nats-bridge binary (default: from PATH)
#   --env K=V       one more environment variable (repeatable), e.g.
#                   OPENCODE_BRIDGE__METRICS__LISTEN=127.0.0.1:9464
#   --print         print the systemd-run command instead of running it
#
# Then: systemctl [--user] status NAME, journalctl [--user] -u NAME -f,
# systemctl [--user] stop NAME (graceful: in-flight turns finish).
set -euo pipefail

user_mode=0 name=opencode-nats-bridge-sidecar config="" dir="$PWD" nats="" creds=""
as_user="" bin="" print=0
envs=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --user) user_mode=1 ;;
    --name) name="$2"; shift ;;
    --config) config="$(realpath "$2")"; shift ;;
    --dir) dir="$(realpath "$2")"; shift ;;
    --nats) nats="$2"; shift ;;
    --creds) creds="$(realpath "$2")"; shift ;;
    --as) as_user="$2"; shift ;;
    --bin) bin="$2"; shift ;;
    --env) envs+=("$2"); shift ;;
    --print) print=1 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done

if [ -z "$bin" ]; then
  bin="$(command -v opencode-nats-bridge || true)"
  [ -n "$bin" ] || { echo "opencode-nats-bridge is not on PATH; pass --bin" >&2; exit 1; }
fi
bin="$(realpath "$bin")"
run_args=(run)
[ -n "$config" ] && run_args+=(--config "$config")
run_args+=("${extra[@]}")

# A bad config fails here, not in a restart loop.
check=(check-config)
[ -n "$config" ] && check+=(--config "$config")
if [ "$print" = 0 ]; then
  env ${nats:+OPENCODE_BRIDGE__NATS__URL="$nats"} "${envs[@]}" "$bin" "${check[@]}" >/dev/null
fi

cmd=(systemd-run)
[ "$user_mode" = 1 ] && cmd+=(--user)
cmd+=(
  --unit "$name"
  --description "opencode-nats-bridge sidecar ($dir)"
  --collect
  -p Type=notify
  -p NotifyAccess=main
  -p TimeoutStartSec=90s
  -p WatchdogSec=60s
  -p Restart=on-failure
  -p RestartSec=2s
  -p RestartPreventExitStatus=78
  -p TimeoutStopSec=75s
  -p KillMode=mixed
  -p WorkingDirectory="$dir"
  -p NoNewPrivileges=yes
)
# A user manager may not be able to set up a private /tmp.
[ "$user_mode" = 0 ] && cmd+=(-p PrivateTmp=yes)
[ -n "$as_user" ] && cmd+=(-p User="$as_user")
[ -n "$nats" ] && cmd+=(--setenv OPENCODE_BRIDGE__NATS__URL="$nats")
if [ -n "$creds" ]; then
  if [ "$user_mode" = 1 ]; then
    # Your own file, read by your own process.
    cmd+=(--setenv OPENCODE_BRIDGE__NATS__CREDENTIALS_FILE="$creds")
  else
    # Copied by systemd to /run/credentials/<unit>/ (readable by the
    # service only); specifiers such as %d are not expanded in transient
    # properties, so the path is spelled out.
    cmd+=(-p LoadCredential="nats.creds:$creds"
          --setenv OPENCODE_BRIDGE__NATS__CREDENTIALS_FILE="/run/credentials/$name.service/nats.creds")
  fi
fi
for e in "${envs[@]}"; do cmd+=(--setenv "$e"); done
cmd+=("$bin" "${run_args[@]}")

if [ "$print" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
# For Type=notify, systemd-run returns once the daemon said READY=1 (or
# failed to).
"${cmd[@]}"
scope=""; [ "$user_mode" = 1 ] && scope="--user "
echo "started $name: systemctl ${scope}status $name; journalctl ${scope}-u $name -f; systemctl ${scope}stop $name" >&2
