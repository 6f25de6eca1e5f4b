# Shared by deploy/local/up, down and test. Source it; do not run it.
# Everything lives under $SLUICE_STATE (default: <repo>/.sluice): logs, pid files, data.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${SLUICE_STATE:-$ROOT/.sluice}"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}"
export PATH="$HOME/.cargo/bin:$PATH"

KAFKA_PORT="${SLUICE_KAFKA_PORT:-9092}"
CLICKHOUSE_HTTP_PORT="${SLUICE_CLICKHOUSE_HTTP_PORT:-8123}"
CLICKHOUSE_TCP_PORT="${SLUICE_CLICKHOUSE_TCP_PORT:-19000}"
PG_HOST="${SLUICE_PG_HOST:-127.0.0.1}"
PG_PORT="${SLUICE_PG_PORT:-5432}"
REDIS_PORT="${SLUICE_REDIS_PORT:-6379}"
EDGE_PORT="${SLUICE_EDGE_PORT:-8080}"
REGISTRY_PORT="${SLUICE_REGISTRY_PORT:-8081}"
# memory://tansu/ keeps topics in memory: fast, and light on CPU while consumers poll, but a
# broker restart empties them (up recreates the topics). sqlite://tansu.db is durable and slower.
BROKER_STORAGE="${SLUICE_BROKER_STORAGE:-memory://tansu/}"
SLUICE_PROFILE="${SLUICE_PROFILE:-debug}"
# The broker's async worker threads (see start_broker).
BROKER_THREADS="${SLUICE_BROKER_THREADS:-1}"
TANSU_VERSION=0.6.0
TANSU_PATCHES="$(cd "$ROOT/deploy/local/tansu" && find . -name '*.patch' | sort | xargs -I{} sh -c 'echo {}; cat {}' | cksum | cut -d' ' -f1)"
TANSU_ROOT="${SLUICE_TOOLS:-$HOME/.cache/sluice-tools}/tansu-$TANSU_VERSION-$TANSU_PATCHES"
TANSU="$TANSU_ROOT/bin/tansu"

mkdir -p "$LOGS" "$PIDS"

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for DESCRIPTION SECONDS COMMAND...: retries COMMAND every 0.25 s.
wait_for() {
  local what="$1" seconds="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then
      die "$what did not come up within ${seconds}s (logs: $LOGS)"
    fi
    sleep 0.25
  done
}

# alive PID: whether PID is a live process. A process that was killed but not yet reaped by
# its parent (a zombie, which an init that reaps late leaves behind, as in many containers)
# still answers `kill -0`; its state says it is dead.
alive() {
  local state
  state="$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# running NAME: whether the process we started as NAME is alive.
running() {
  local pidfile="$PIDS/$1.pid"
  [[ -f "$pidfile" ]] && alive "$(cat "$pidfile")"
}

# start NAME DIR COMMAND...: starts COMMAND in DIR in the background, in its own session,
# logging to $LOGS/NAME.log and recording its pid.
start() {
  local name="$1" dir="$2"; shift 2
  ( cd "$dir" && exec setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null ) &
  echo $! >"$PIDS/$name.pid"
}

# stop NAME: stops what we started as NAME (TERM, then KILL after 15 s).
stop() {
  local name="$1" pidfile="$PIDS/$1.pid"
  [[ -f "$pidfile" ]] || return 0
  local pid; pid="$(cat "$pidfile")"
  if alive "$pid"; then
    say "stopping $name (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do alive "$pid" || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

APT_UPDATED=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  (( ${#missing[@]} )) || return 0
  say "installing ${missing[*]} (apt)"
  if (( APT_UPDATED == 0 )); then
    apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_missing() {
  command -v apt-get >/dev/null || die "this script installs with apt-get (Debian/Ubuntu)"
  apt_install clickhouse-server clickhouse-client gcc g++ make pkg-config libssl-dev zlib1g-dev \
    postgresql-client redis-server redis-tools curl python3 patch
  command -v cargo >/dev/null || die "cargo is missing: install Rust with rustup first"
  [ -x "$TANSU" ] || install_tansu
  if ! python3 -c 'import openai, jsonschema' 2>/dev/null; then
    say "installing the OpenAI Python SDK and jsonschema (pip), for the SDK example and its tests"
    python3 -m pip install --quiet --disable-pip-version-check openai jsonschema
  fi
  if ! command -v cargo-nextest >/dev/null; then
    say "installing cargo-nextest"
    cargo install cargo-nextest --locked
  fi
}

# tansu from crates.io with the patches in deploy/local/tansu/<crate>/ (see deploy/local/README.md),
# built with the lock file it was published with. The install directory names the patch set, so
# a changed set builds anew and a plain `tansu` elsewhere on the PATH is never used by mistake.
install_tansu() {
  say "building the tansu broker $TANSU_VERSION with the patches in deploy/local/tansu/ (about 10 minutes on 2 cores)"
  local build="$TANSU_ROOT.build" patches="$ROOT/deploy/local/tansu" crate patch registry
  local crates=(tansu)
  for crate in "$patches"/*/; do crates+=("$(basename "$crate")"); done
  rm -rf "$build"
  mkdir -p "$build/fetch/src"
  # Cargo fetches the published sources: a throwaway package that depends on them.
  printf '[package]\nname = "fetch-tansu"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\n' \
    >"$build/fetch/Cargo.toml"
  for crate in "${crates[@]}"; do
    printf '%s = "=%s"\n' "$crate" "$TANSU_VERSION" >>"$build/fetch/Cargo.toml"
  done
  echo 'fn main() {}' >"$build/fetch/src/main.rs"
  (cd "$build/fetch" && cargo fetch --quiet)
  registry="$(dirname "$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tansu-"$TANSU_VERSION" | head -n1)")"
  printf '\n[patch.crates-io]\n' >"$build/patch.toml"
  for crate in "${crates[@]}"; do
    cp -r "$registry/$crate-$TANSU_VERSION" "$build/$crate"
    chmod -R u+w "$build/$crate"
    [ "$crate" = tansu ] && continue
    for patch in "$patches/$crate"/*.patch; do
      patch --quiet -p1 -d "$build/$crate" <"$patch"
    done
    printf '%s = { path = "../%s" }\n' "$crate" "$crate" >>"$build/patch.toml"
  done
  cat "$build/patch.toml" >>"$build/tansu/Cargo.toml"
  # Points the published lock file at the patched crates; every other version stays as locked.
  cargo metadata --quiet --format-version 1 --manifest-path "$build/tansu/Cargo.toml" >/dev/null
  cargo install --locked --path "$build/tansu" --features libsql,dynostore --root "$TANSU_ROOT" \
    --target-dir "$build/target"
  rm -rf "$build"
}

pg_superuser() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

start_postgres() {
  if ! pg_superuser -c 'select 1' >/dev/null 2>&1; then
    say "starting PostgreSQL"
    if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql >/dev/null 2>&1; then
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    fi
    wait_for "PostgreSQL" 30 pg_superuser -c 'select 1'
  fi
  # Roles: sluice owns the schema and runs migrations; sluice_app is what services use, and
  # row-level security applies to it.
  pg_superuser <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice') THEN CREATE ROLE sluice LOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN CREATE ROLE sluice_app LOGIN NOSUPERUSER NOBYPASSRLS; END IF;
END $$;
SQL
  if [[ "$(pg_superuser -c "select 1 from pg_database where datname = 'sluice'")" != "1" ]]; then
    say "creating database sluice"
    pg_superuser -c 'CREATE DATABASE sluice OWNER sluice'
  fi
}

redis_ping() { redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

# Redis holds the limits' counters. Machines that run it already keep it; otherwise it runs
# here without persistence (the monthly budget counters are seeded again from ClickHouse).
start_redis() {
  if redis_ping; then return 0; fi
  say "starting Redis on :$REDIS_PORT"
  mkdir -p "$STATE/redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$STATE/redis" --logfile "$LOGS/redis.log" --pidfile "$PIDS/redis.pid"
  wait_for "Redis" 30 redis_ping
}

clickhouse_ping() { curl -fsS "http://127.0.0.1:$CLICKHOUSE_HTTP_PORT/ping" | grep -q Ok; }

start_clickhouse() {
  if clickhouse_ping 2>/dev/null; then return 0; fi
  say "starting ClickHouse on :$CLICKHOUSE_HTTP_PORT"
  local dir="$STATE/clickhouse"
  mkdir -p "$dir"/{data,tmp,log,user_files,format_schemas}
  cp "$ROOT/deploy/local/clickhouse/users.xml" "$dir/users.xml"
  sed -e "s#@STATE@#$STATE#g" -e "s#@HTTP_PORT@#$CLICKHOUSE_HTTP_PORT#g" -e "s#@TCP_PORT@#$CLICKHOUSE_TCP_PORT#g" \
    "$ROOT/deploy/local/clickhouse/config.xml.in" >"$dir/config.xml"
  start clickhouse "$dir" clickhouse-server --config-file="$dir/config.xml"
  wait_for "ClickHouse" 60 clickhouse_ping
}

start_broker() {
  if port_open "$KAFKA_PORT"; then
    # A broker an earlier `up` started from another build (before a patch changed) is replaced;
    # one started by something else is used as it is.
    if running broker \
      && [ "$(readlink -f "/proc/$(cat "$PIDS/broker.pid")/exe")" != "$(readlink -f "$TANSU")" ]; then
      say "replacing the running broker: it is not the build in $TANSU_ROOT"
      stop broker
    else
      return 0
    fi
  fi
  say "starting the tansu broker on :$KAFKA_PORT ($BROKER_STORAGE)"
  mkdir -p "$STATE/tansu"
  # A relative sqlite path, resolved in $STATE/tansu (tansu doubles absolute ones).
  # One async worker: on a couple of cores, a second one mostly wakes up to steal the first
  # one's tasks, and those cross-thread wake-ups cost the broker more than its work.
  start broker "$STATE/tansu" env TOKIO_WORKER_THREADS="$BROKER_THREADS" "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine "$BROKER_STORAGE"
  wait_for "the broker" 60 port_open "$KAFKA_PORT"
}

# Cargo decides what to rebuild from file times, so a target directory shared by two checkouts
# can hand one checkout the other's build of Sluice's own crates. When the checkout changes,
# drop those crates' artifacts (dependencies stay cached).
claim_target_dir() {
  local marker="$CARGO_TARGET_DIR/.sluice-checkout"
  mkdir -p "$CARGO_TARGET_DIR"
  if [[ -f "$marker" && "$(cat "$marker")" != "$ROOT" ]]; then
    say "the build cache was last used by $(cat "$marker"); rebuilding Sluice's own crates"
    local crates=(-p sluice -p sluice-schemas -p sluice-stores -p sluice-pipelines -p sluice-sql
      -p sluice-router -p sluice-orchestrator -p sluice-clickhouse-sink -p sluice-edge)
    (cd "$ROOT" && cargo clean -q "${crates[@]}" && cargo clean -q --release "${crates[@]}")
  fi
  echo "$ROOT" >"$marker"
}

build_sluice() {
  claim_target_dir
  say "building sluice ($SLUICE_PROFILE)"
  local flags=()
  [[ "$SLUICE_PROFILE" == release ]] && flags+=(--release)
  (cd "$ROOT" && cargo build --bin sluice "${flags[@]}")
  SLUICE_BIN="$CARGO_TARGET_DIR/$SLUICE_PROFILE/sluice"
  export SLUICE_BIN
}

# The environment every sluice command of the local stack runs with.
export_sluice_env() {
  export SLUICE_KAFKA__BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
  export SLUICE_CLICKHOUSE__URL="http://127.0.0.1:$CLICKHOUSE_HTTP_PORT"
  export SLUICE_POSTGRES__URL="postgres://sluice_app@$PG_HOST:$PG_PORT/sluice"
  export SLUICE_POSTGRES__ADMIN_URL="postgres://sluice@$PG_HOST:$PG_PORT/sluice"
  export SLUICE_REDIS__URL="redis://127.0.0.1:$REDIS_PORT"
  export SLUICE_EDGE__LISTEN="127.0.0.1:$EDGE_PORT"
  export SLUICE_REGISTRY__LISTEN="127.0.0.1:$REGISTRY_PORT"
  export SLUICE_REGISTRY__URL="http://127.0.0.1:$REGISTRY_PORT"
  # One machine: webhook endpoints for local receivers live on loopback.
  export SLUICE_WEBHOOKS__ALLOW_PRIVATE_NETWORKS="${SLUICE_WEBHOOKS__ALLOW_PRIVATE_NETWORKS:-true}"
}

start_stack() {
  start_postgres
  start_redis
  start_clickhouse
  start_broker
}
