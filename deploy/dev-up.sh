#!/usr/bin/env bash
# One command from a fresh machine to a running bridge on its embedded
# defaults: installs nats-server and OpenCode into .tools/ if missing,
# starts a nats-server on 127.0.0.1:4222 if none answers there, then runs
# the daemon, which starts `opencode serve` itself in the current directory.
# Ctrl-C stops it (gracefully).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/.ci/install-deps"
export PATH="$root/.tools/bin:$PATH"

if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  store="${XDG_STATE_HOME:-$HOME/.local/state}/opencode-nats-bridge/nats"
  mkdir -p "$store"
  echo "starting nats-server on 127.0.0.1:4222 (store: $store, log: $store/nats.log)" >&2
  nats-server -a 127.0.0.1 -p 4222 -js -sd "$store" -l "$store/nats.log" &
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done
fi

cargo build --release --locked --quiet --manifest-path "$root/Cargo.toml"
exec "$root/target/release/opencode-nats-bridge" run "$@"
