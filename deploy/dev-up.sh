#!/usr/bin/env bash
# One command from a fresh machine to a running bridge on its embedded
# defaults: installs nats-server and OpenCode into .tools/ if missing,
# finds a NATS server it can use (or starts the pinned one), builds the
# daemon (release), then runs it; the daemon starts `opencode serve` itself
# in the current directory. Once its own daemon serves, prints the command
# to try.
#
# NATS: it looks at the server answering on 127.0.0.1:4222 (DEV_UP_NATS=
# host:port looks elsewhere). A nats-server 2.10 or newer with JetStream on
# is used as it is; an older one (Debian's 2.9.10) or one without JetStream
# is left alone and the pinned .tools/bin/nats-server starts on a free port
# instead (one line says so); with nothing there, the pinned one starts
# there. The daemon is pointed at the server chosen
# (OPENCODE_BRIDGE__NATS__URL).
#
# One dev-up per directory: a second one in the same directory, while the
# first runs, says where it runs and exits 1.
#
# DEV_UP_BIN=path runs that daemon binary instead of building one.
#
# Ctrl-C (or SIGTERM to this script) stops the daemon gracefully; a
# nats-server this script started is stopped after the daemon has exited
# (it runs in its own process group, so a Ctrl-C does not stop it during the
# daemon's drain). Arguments go to `opencode-nats-bridge run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${DEV_UP_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/opencode-nats-bridge}"
probe="${DEV_UP_NATS:-127.0.0.1:4222}"
probe_host="${probe%:*}"
probe_port="${probe##*:}"
step() { printf '\n==> %s\n' "$*" >&2; }

# One dev-up per directory: its pid in a file named after the directory.
locks="${XDG_RUNTIME_DIR:-${TMPDIR:-/tmp}}/opencode-nats-bridge-dev-up"
mkdir -p "$locks"
lock="$locks/$(printf %s "$PWD" | sha256sum | cut -c1-16).pid"
if other="$(cat "$lock" 2>/dev/null)" && [ -n "$other" ] && [ "$other" != "$$" ] \
  && tr '\0' ' ' <"/proc/$other/cmdline" 2>/dev/null | grep -q dev-up.sh; then
  echo "dev-up: a bridge started by dev-up.sh already runs in $PWD (dev-up pid $other, lock $lock): use that one, or stop it first (Ctrl-C in its terminal, or kill $other)" >&2
  exit 1
fi
echo "$$" >"$lock"

nats_pid=""
nats_tmp=""
daemon_pid=""
poller_pid=""
daemon_log=""
cleanup() {
  if [ -n "$poller_pid" ]; then kill "$poller_pid" 2>/dev/null || true; fi
  if [ -n "$nats_pid" ] && kill -0 "$nats_pid" 2>/dev/null; then
    echo "dev-up: stopping the nats-server it started (pid $nats_pid)" >&2
    kill -TERM "$nats_pid" 2>/dev/null || true
    wait "$nats_pid" 2>/dev/null || true
  fi
  if [ -n "$nats_tmp" ]; then rm -rf "$nats_tmp"; fi
  if [ -n "$daemon_log" ]; then rm -f "$daemon_log"; fi
  if [ "$(cat "$lock" 2>/dev/null)" = "$$" ]; then rm -f "$lock"; fi
}
trap cleanup EXIT
# A Ctrl-C before the daemon runs (say, during the build) still stops the
# nats-server started below: exit through the EXIT trap.
trap 'exit 130' INT TERM

step "[1/4] nats-server and OpenCode into $root/.tools/ (first time: about a minute)"
bash "$root/.ci/install-deps"
export PATH="$root/.tools/bin:$PATH"
pinned="$root/.tools/bin/nats-server"

# The INFO line a NATS server at $1:$2 sends first, or nothing.
nats_info() {
  (exec 3<>"/dev/tcp/$1/$2" && IFS= read -r -t 3 line <&3 && printf '%s\n' "$line") 2>/dev/null || true
}
# Why the server that sent INFO line $1 will not do; nothing when it will.
unusable() {
  local info="$1" version major minor
  case "$info" in "INFO "*) ;; *) echo "does not speak NATS"; return ;; esac
  version="$(printf '%s' "$info" | sed -n 's/.*"version":"\([^"]*\)".*/\1/p')"
  major="${version%%.*}"
  minor="${version#*.}"
  minor="${minor%%.*}"
  if ! { [ "$major" -gt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -ge 10 ]; }; } 2>/dev/null; then
    echo "is nats-server ${version:-of an unknown version}, which has no JetStream API this daemon can use (2.10 or newer)"
  elif ! printf '%s' "$info" | grep -q '"jetstream":true'; then
    echo "is nats-server $version with JetStream off"
  fi
}
# Starts the pinned nats-server on 127.0.0.1:$1 with JetStream, store $2.
start_nats() {
  mkdir -p "$2"
  # setsid: its own process group, so a Ctrl-C meant for the daemon does
  # not stop NATS while the daemon is still draining.
  setsid "$pinned" -a 127.0.0.1 -p "$1" -js -sd "$2" -l "$2/nats.log" &
  nats_pid=$!
  for _ in $(seq 100); do
    if [ -n "$(nats_info 127.0.0.1 "$1")" ]; then return 0; fi
    kill -0 "$nats_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "dev-up: the nats-server it started on 127.0.0.1:$1 does not answer; its log: $2/nats.log" >&2
  exit 1
}

step "[2/4] NATS on $probe"
info="$(nats_info "$probe_host" "$probe_port")"
if [ -z "$info" ] && ! (exec 3<>"/dev/tcp/$probe_host/$probe_port") 2>/dev/null; then
  store="${XDG_STATE_HOME:-$HOME/.local/state}/opencode-nats-bridge/nats"
  echo "starting nats-server on 127.0.0.1:$probe_port (store: $store, log: $store/nats.log)" >&2
  start_nats "$probe_port" "$store"
  url="nats://127.0.0.1:$probe_port"
elif why="$(unusable "$info")" && [ -z "$why" ]; then
  echo "the NATS server on $probe ($(printf '%s' "$info" | sed -n 's/.*"version":"\([^"]*\)".*/nats-server \1/p'), JetStream on): using it" >&2
  url="nats://$probe"
else
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  nats_tmp="$(mktemp -d)"
  echo "the NATS server on $probe $why: starting the pinned $("$pinned" --version | sed "s/^nats-server: v/nats-server /") on 127.0.0.1:$port instead (store and log: $nats_tmp)" >&2
  start_nats "$port" "$nats_tmp"
  url="nats://127.0.0.1:$port"
fi
export OPENCODE_BRIDGE__NATS__URL="$url"

step "[3/4] building the daemon (release; the first build takes several minutes, later ones seconds)"
if [ -n "${DEV_UP_BIN:-}" ]; then
  echo "DEV_UP_BIN: running $bin (not building)" >&2
else
  # From the repository, so its .cargo/config.toml applies (the runtime's
  # LIFO slot off, README "Performance").
  (cd "$root" && cargo build --release --locked)
fi

step "[4/4] running the daemon (it starts \`opencode serve\` in $(pwd)); Ctrl-C stops it"
# Its log goes to the terminal and to a file this script reads to know when
# its own daemon serves (another daemon on the same NATS would answer a
# `status` as well). tee ignores Ctrl-C, so the daemon's drain still shows.
daemon_log="$(mktemp)"
"$bin" run "$@" 2> >(trap '' INT; exec tee -a "$daemon_log" >&2) &
daemon_pid=$!
# Forward a signal sent to this script alone (a Ctrl-C reaches the daemon
# directly, being in this process group); then wait for the drain.
trap 'kill -TERM "$daemon_pid" 2>/dev/null || true' INT TERM

# Once this daemon says it serves, say what to type next: the command its
# log prints too (README, "Quick start"), with --server when NATS is not
# on the default address.
server=""
if [ "$url" != "nats://127.0.0.1:4222" ]; then server=" --server $url"; fi
(
  while kill -0 "$daemon_pid" 2>/dev/null; do
    if grep -q "opencode-nats-bridge is serving" "$daemon_log" 2>/dev/null; then
      cat >&2 <<EOF

==> The bridge is serving (pid $daemon_pid, NATS $url). In another terminal, try:

      $bin prompt$server --conversation demo 'Write a haiku about queues'

    (or, with the nats CLI: nats req$server opencode.prompt.demo 'Write a haiku about queues' --replies 0 --timeout 120s)

EOF
      exit 0
    fi
    sleep 0.5
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
