#!/usr/bin/env bash
# One command from a fresh machine to a running bridge on its embedded
# defaults: installs nats-server and OpenCode into .tools/ if missing,
# starts a nats-server on 127.0.0.1:4222 if none answers there, builds the
# daemon (release), then runs it; the daemon starts `opencode serve` itself
# in the current directory. Once it serves, prints the command to try.
#
# Ctrl-C (or SIGTERM to this script) stops the daemon gracefully; a
# nats-server this script started is stopped after the daemon has exited
# (it runs in its own process group, so a Ctrl-C does not stop it during the
# daemon's drain). Arguments go to `opencode-nats-bridge run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${CARGO_TARGET_DIR:-$root/target}/release/opencode-nats-bridge"
step() { printf '\n==> %s\n' "$*" >&2; }

step "[1/4] nats-server and OpenCode into $root/.tools/ (first time: about a minute)"
bash "$root/.ci/install-deps"
export PATH="$root/.tools/bin:$PATH"

nats_pid=""
daemon_pid=""
poller_pid=""
cleanup() {
  if [ -n "$poller_pid" ]; then kill "$poller_pid" 2>/dev/null || true; fi
  if [ -n "$nats_pid" ] && kill -0 "$nats_pid" 2>/dev/null; then
    echo "dev-up: stopping the nats-server it started (pid $nats_pid)" >&2
    kill -TERM "$nats_pid" 2>/dev/null || true
    wait "$nats_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
# A Ctrl-C before the daemon runs (say, during the build) still stops the
# nats-server started below: exit through the EXIT trap.
trap 'exit 130' INT TERM

step "[2/4] NATS on 127.0.0.1:4222"
if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  echo "a NATS server already answers on 127.0.0.1:4222: using it" >&2
else
  store="${XDG_STATE_HOME:-$HOME/.local/state}/opencode-nats-bridge/nats"
  mkdir -p "$store"
  echo "starting nats-server on 127.0.0.1:4222 (store: $store, log: $store/nats.log)" >&2
  # setsid: its own process group, so a Ctrl-C meant for the daemon does
  # not stop NATS while the daemon is still draining.
  setsid nats-server -a 127.0.0.1 -p 4222 -js -sd "$store" -l "$store/nats.log" &
  nats_pid=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done
fi

step "[3/4] building the daemon (release; the first build takes several minutes, later ones seconds)"
# From the repository, so its .cargo/config.toml applies (the runtime's
# LIFO slot off, README "Performance").
(cd "$root" && cargo build --release --locked)

step "[4/4] running the daemon (it starts \`opencode serve\` in $(pwd)); Ctrl-C stops it"
"$bin" run "$@" &
daemon_pid=$!
# Forward a signal sent to this script alone (a Ctrl-C reaches the daemon
# directly, being in this process group); then wait for the drain.
trap 'kill -TERM "$daemon_pid" 2>/dev/null || true' INT TERM

# Once the daemon answers `status`, say what to type next.
(
  while kill -0 "$daemon_pid" 2>/dev/null; do
    if "$bin" status --server nats://127.0.0.1:4222 --timeout 1s >/dev/null 2>&1; then
      cat >&2 <<EOF

==> The bridge is serving. In another terminal, try:

      $bin prompt --server nats://127.0.0.1:4222 --conversation demo 'Write a haiku about queues'

    (or, with the nats CLI: nats req opencode.prompt.demo 'Write a haiku about queues' --replies 0 --timeout 120s)

EOF
      exit 0
    fi
    sleep 1
  done
) &
poller_pid=$!

# `wait` returns early when a trapped signal arrives: wait until the daemon
# has really exited, then take its exit status.
while kill -0 "$daemon_pid" 2>/dev/null; do
  wait "$daemon_pid" || true
done
status=0
wait "$daemon_pid" || status=$?
exit "$status"
