#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head and N worker nodes, each a real
# raylet with its own temp dir, ports and resources, authenticated with a token
# (Ray 2.60's default). For trying cluster-wide sweeps, node failures and job
# submission locally; the tests use it.
#
#   cluster/local_cluster.sh start [--workers N] [--cpus C] [--port P] [--dashboard-port D] [--dir DIR]
#   cluster/local_cluster.sh status             # nodes and resources (ray status)
#   cluster/local_cluster.sh env                # `eval "$(cluster/local_cluster.sh env)"`: the token for
#                                               # xfer tune --address / ray job submit from this shell
#   cluster/local_cluster.sh kill-node K        # SIGKILL worker K's raylet (a node dies; fault drills)
#   cluster/local_cluster.sh stop
#
# The cluster's files live in DIR (default ${XFER_CLUSTER_DIR:-/tmp/xfer-cluster}), never in the
# repository: DIR/auth_token (mode 600; RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, when set, is used
# instead of a new one), DIR/cluster.env (address, ports), and one Ray temp dir per node
# (DIR/head, DIR/w1, ...). `start` prints the address on its last line.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
RAY=${RAY:-$HERE/../.venv/bin/ray}
[ -x "$RAY" ] || RAY=$(command -v ray)
DIR=${XFER_CLUSTER_DIR:-/tmp/xfer-cluster}
WORKERS=1
CPUS=1
PORT=6390
DASH=8265

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd=${1:-}; [ -n "$cmd" ] || usage; shift
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --dashboard-port) DASH=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    [0-9]*) NODE=$1; shift ;;
    *) echo "local_cluster.sh: unknown option $1" >&2; usage ;;
  esac
done
[ "$cmd" = start ] && mkdir -p "$DIR"
[ -d "$DIR" ] && DIR=$(cd "$DIR" && pwd)   # absolute: the processes' command lines name it
TOKEN_FILE=$DIR/auth_token

# Ports of node k (0 = head): a block of 10 above the head's GCS port, so several clusters
# on one machine only need different --port values. Keep them clear of Ray's worker ports
# (10002-19999 by default) and of the kernel's ephemeral range (32768-60999 on Linux):
# below 10000 or in 20000-32000.
# Ray's worker processes take ports the OS chooses.
ports() {  # k -> "node_manager object_manager agent_listen agent_grpc runtime_env metrics"
  local b=$((PORT + 10 + 10 * $1))
  echo "$b $((b + 1)) $((b + 2)) $((b + 3)) $((b + 4)) $((b + 5))"
}

node_args() {  # k -> ray start flags for node k's own temp dir and ports
  local name=$2
  read -r nm om al ag re me <<<"$(ports "$1")"
  echo "--temp-dir=$DIR/$name --node-ip-address=127.0.0.1 --num-cpus=$CPUS --resources={\"$name\":1}" \
    "--node-manager-port=$nm --object-manager-port=$om --dashboard-agent-listen-port=$al" \
    "--dashboard-agent-grpc-port=$ag --runtime-env-agent-port=$re --metrics-export-port=$me"
}

# Each node keeps its own trial-data cache (tune/data.py), as separate machines would,
# unless XFER_NODE_CACHE is set for all.
node_env() {  # name command... : run the command with the node's environment
  local name=$1; shift
  XFER_NODE_CACHE=${XFER_NODE_CACHE:-$DIR/$name/xfer_node_cache} "$@"
}

token_env() {
  export RAY_AUTH_MODE=token
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    (umask 077 && printf %s "$RAY_AUTH_TOKEN" >"$TOKEN_FILE")
  elif [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && [ "$RAY_AUTH_TOKEN_PATH" != "$TOKEN_FILE" ]; then
    (umask 077 && cp "$RAY_AUTH_TOKEN_PATH" "$TOKEN_FILE")
  elif [ ! -s "$TOKEN_FILE" ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$TOKEN_FILE")
  fi
  unset RAY_AUTH_TOKEN
  export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
}

# The processes of this cluster (and only these): their command lines name a node's temp dir.
pids() { pgrep -f -- "$DIR/(head|w[0-9]+)/" || true; }

# A failed start leaves nothing running: show the log (or the message), stop what started.
fail() {
  [ -n "$1" ] && tail -5 "$1" >&2
  [ -n "${2:-}" ] && echo "local_cluster.sh: $2" >&2
  "$0" stop --dir "$DIR" >/dev/null 2>&1 || true
  exit 1
}

case "$cmd" in
  start)
    if [ -n "$(pids)" ]; then
      echo "local_cluster.sh: a cluster is already running in $DIR (stop it first)" >&2; exit 1
    fi
    token_env
    # shellcheck disable=SC2046
    node_env head "$RAY" start --head --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
      --ray-client-server-port=$((PORT + 1)) --include-dashboard=true --disable-usage-stats $(node_args 0 head) >"$DIR/head.log" 2>&1 ||
      { cat "$DIR/head.log" >&2; exit 1; }
    for k in $(seq 1 "$WORKERS"); do
      # shellcheck disable=SC2046
      node_env "w$k" "$RAY" start --address="127.0.0.1:$PORT" --disable-usage-stats $(node_args "$k" "w$k") \
        >"$DIR/w$k.log" 2>&1 || fail "$DIR/w$k.log"
    done
    # wait until every node has registered with the head
    for _ in $(seq 1 120); do
      n=$("$RAY" status --address "127.0.0.1:$PORT" 2>/dev/null | grep -c '^ 1 node_' || true)
      [ "$n" -ge $((WORKERS + 1)) ] && break
      sleep 0.5
    done
    [ "$n" -ge $((WORKERS + 1)) ] || fail "" "only $n of $((WORKERS + 1)) nodes registered"
    cat >"$DIR/cluster.env" <<EOF
RAY_ADDRESS=127.0.0.1:$PORT
XFER_DASHBOARD=http://127.0.0.1:$DASH
XFER_CLUSTER_WORKERS=$WORKERS
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
EOF
    echo "cluster up in $DIR: head + $WORKERS worker node(s), $CPUS CPU(s) each; dashboard http://127.0.0.1:$DASH"
    echo "token: $TOKEN_FILE (eval \"\$($0 env --dir $DIR)\" before xfer tune --address / ray job ...)"
    echo "127.0.0.1:$PORT"
    ;;
  env)
    [ -f "$DIR/cluster.env" ] || { echo "local_cluster.sh: no cluster in $DIR" >&2; exit 1; }
    sed 's/^/export /' "$DIR/cluster.env"
    ;;
  status)
    [ -f "$DIR/cluster.env" ] || { echo "local_cluster.sh: no cluster in $DIR" >&2; exit 1; }
    set -a; . "$DIR/cluster.env"; set +a
    "$RAY" status --address "$RAY_ADDRESS"
    ;;
  kill-node)
    [ -n "${NODE:-}" ] && [ "$NODE" -ge 1 ] || { echo "local_cluster.sh: kill-node needs a worker number >= 1" >&2; exit 2; }
    pid=$(pgrep -f -- "raylet.*$DIR/w$NODE/" | head -1 || true)
    [ -n "$pid" ] || { echo "local_cluster.sh: no raylet for worker $NODE in $DIR" >&2; exit 1; }
    kill -9 "$pid"
    echo "killed worker $NODE's raylet (pid $pid)"
    ;;
  stop)
    for sig in TERM KILL; do
      p=$(pids)
      [ -z "$p" ] && break
      # shellcheck disable=SC2086
      kill -s $sig $p 2>/dev/null || true
      for _ in $(seq 1 50); do
        live=$(for q in $(pids); do [ "$(ps -o stat= -p "$q" 2>/dev/null | cut -c1)" = Z ] || echo "$q"; done)
        [ -z "$live" ] && break 2
        sleep 0.2
      done
    done
    rm -f "$DIR/cluster.env"
    echo "cluster in $DIR stopped"
    ;;
  *) usage ;;
esac
