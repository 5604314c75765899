#!/usr/bin/env bash
# Compares bkpool's gateway with HAProxy (with and without splice), nginx
# stream, stunnel, socat and a direct connection on this machine, in
# interleaved rounds, and prints a markdown table of medians with the
# spread across rounds, the ratio to HAProxy and which targets bkpool meets.
#
# The proxy under test is pinned to core 0; the load generator and the
# backend to core 1. Everything runs on 127.0.0.1, every run is bounded in
# time, and everything started here is stopped on exit.
#
#   benches/compare.sh                  # 3 rounds of every scenario
#   benches/compare.sh --quick          # one short round: does it all work?
#   benches/compare.sh --scenarios tls-1,hs --proxies haproxy,bkpool-term
set -euo pipefail

usage() {
    cat <<'EOF'
usage: benches/compare.sh [options]
  --rounds N           interleaved rounds (default 3)
  --seconds S          length of each measured run (default 5)
  --scenarios LIST     comma-separated, from: tcp-1 tcp-8 pass-1 pass-8
                       tls-1 tls-8 hs lat-tcp lat-tls idle (default: all)
  --proxies LIST       comma-separated, from: direct socat haproxy
                       haproxy-splice nginx stunnel bkpool-term bkpool-pass
                       (default: all)
  --idle-conns N       connections held in the idle scenario (default 5000)
  --quick              one round of 1-second runs, 500 idle connections
  --out DIR            where results.jsonl and table.md go
                       (default: target/compare/<UTC time>)
  --no-install         do not apt-get install missing peers
  --no-build           use the release binaries already built
  --nice N             run proxy, backend and load at nice -N (root): shields
                       the numbers from other work on a shared machine
EOF
}

ORIGINAL_ARGS="$*"
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=3
RUN_SECONDS=5
SCENARIOS="tcp-1,tcp-8,pass-1,pass-8,tls-1,tls-8,hs,lat-tcp,lat-tls,idle"
PROXIES="direct,socat,haproxy,haproxy-splice,nginx,stunnel,bkpool-term,bkpool-pass"
IDLE_CONNS=5000
INSTALL=1
BUILD=1
OUT=""
NICE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --seconds) RUN_SECONDS=$2; shift 2 ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --proxies) PROXIES=$2; shift 2 ;;
        --idle-conns) IDLE_CONNS=$2; shift 2 ;;
        --quick) ROUNDS=1; RUN_SECONDS=1; IDLE_CONNS=500; QUICK=1; shift ;;
        --out) OUT=$2; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --no-build) BUILD=0; shift ;;
        --nice) NICE=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
QUICK=${QUICK:-0}
WARMUP=1
[[ $QUICK == 1 ]] && WARMUP=0.5
BOOST=()
[[ $NICE != 0 ]] && BOOST=(nice -n "-$NICE")
IFS=, read -r -a SCENARIO_LIST <<<"$SCENARIOS"
IFS=, read -r -a PROXY_LIST <<<"$PROXIES"
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
OUT=${OUT:-$TARGET_DIR/compare/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/bkpool-compare.XXXXXX)
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# --- cleanup: stop everything started here --------------------------------

STARTED=()
stop_all() {
    local pid
    for pid in "${STARTED[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    # Bounded: whatever has not exited after 5 s is killed.
    local i
    for i in $(seq 50); do
        any_alive "${STARTED[@]}" || break
        sleep 0.1
    done
    for pid in "${STARTED[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    STARTED=()
}
any_alive() {
    local pid
    for pid in "$@"; do
        kill -0 "$pid" 2>/dev/null && return 0
    done
    return 1
}
cleanup() {
    stop_all
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- peers and binaries ---------------------------------------------------

NGINX_STREAM=/usr/lib/nginx/modules/ngx_stream_module.so
install_peers() {
    local missing=()
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v nginx >/dev/null || missing+=(nginx)
    [[ -f $NGINX_STREAM ]] || missing+=(libnginx-mod-stream)
    command -v stunnel4 >/dev/null || missing+=(stunnel4)
    command -v socat >/dev/null || missing+=(socat)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v ss >/dev/null || missing+=(iproute2)
    [[ ${#missing[@]} -eq 0 ]] && return
    if [[ $INSTALL == 0 ]]; then
        log "missing: ${missing[*]} (and --no-install given)"
        exit 1
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

build() {
    if [[ $BUILD == 1 ]]; then
        log "building loadgen and bkpool (release)"
        (cd "$REPO" && cargo build --release -j "${CARGO_BUILD_JOBS:-2}" \
            -p bkpool -p bkpool-loadgen --bin bkpool --bin loadgen)
    fi
    LOADGEN=$TARGET_DIR/release/loadgen
    BKPOOL=$TARGET_DIR/release/bkpool
    BKPOOL_OK=0
    if [[ -x $BKPOOL ]] && "$BKPOOL" gateway --help >/dev/null 2>&1; then
        BKPOOL_OK=1
    else
        log "bkpool has no runnable 'gateway' yet: bkpool rows are skipped"
    fi
}

# --- certificates ---------------------------------------------------------

# A server CA and a client CA (ECDSA P-256); the server cert names
# bench.example and 127.0.0.1; the client cert carries the URI SAN that
# bkpool maps to the pool local/bench, with EKU clientAuth.
make_certs() {
    local d=$WORK/pki
    mkdir -p "$d"
    cd "$d"
    for ca in server-ca client-ca; do
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $ca.key 2>/dev/null
        openssl req -x509 -new -key $ca.key -subj "/CN=bench $ca" -days 2 -out $ca.pem \
            -addext basicConstraints=critical,CA:TRUE \
            -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    done
    leaf server server-ca "/CN=bench.example" \
        "subjectAltName=DNS:bench.example,IP:127.0.0.1" serverAuth
    leaf client client-ca "/CN=loadgen" \
        "subjectAltName=URI:bkpool://local/bench/loadgen" clientAuth
    cat server.pem server.key >server-full.pem
    cd - >/dev/null
    PKI=$d
    TLS_ARGS=(--tls --ca "$PKI/server-ca.pem" --cert "$PKI/client.pem" --key "$PKI/client.key" --sni bench.example)
}

leaf() {
    local name=$1 ca=$2 subject=$3 san=$4 eku=$5
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$name.key" 2>/dev/null
    openssl req -new -key "$name.key" -subj "$subject" -out "$name.csr" 2>/dev/null
    printf '%s\n' "$san" "extendedKeyUsage=$eku" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA "$ca.pem" -CAkey "$ca.key" -CAcreateserial \
        -days 2 -out "$name.pem" -extfile "$name.ext" 2>/dev/null
}

# --- ports and processes --------------------------------------------------

# Below the ephemeral range (32768+), so client ports never collide.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 12000))
        [[ -z $(ss -Htan "( sport = :$port )") ]] && { echo "$port"; return; }
    done
}

wait_listening() {
    local port=$1 i
    for i in $(seq 100); do
        [[ -n $(ss -Hltn "( sport = :$port )") ]] && return 0
        sleep 0.05
    done
    return 1
}

# start CORE LOGFILE COMMAND...: runs pinned, in the background, remembered.
start() {
    local core=$1 logfile=$2
    shift 2
    taskset -c "$core" "${BOOST[@]}" "$@" >"$logfile" 2>&1 &
    STARTED+=($!)
    LAST_PID=$!
}

# The process and its children (nginx: master and worker).
pids_of() {
    local pids=$1 child
    for child in $(pgrep -P "$1" || true); do
        pids+=",$child"
    done
    echo "$pids"
}

# --- what each scenario needs ---------------------------------------------

# The connection a scenario makes: plain TCP, ClientHello then raw bytes
# (passthrough), or TLS terminated by the proxy.
kind_of() {
    case "$1" in
        tcp-* | lat-tcp) echo plain ;;
        pass-*) echo pass ;;
        *) echo tls ;;
    esac
}

applies() {
    local scenario=$1 proxy=$2 kind
    kind=$(kind_of "$scenario")
    case "$proxy" in
        bkpool-term) [[ $kind == tls && $BKPOOL_OK == 1 ]] ;;
        bkpool-pass) [[ $kind == pass && $BKPOOL_OK == 1 ]] ;;
        stunnel) [[ $kind == tls ]] ;;
        socat) [[ $kind == plain ]] ;;
        direct) [[ $kind != tls ]] ;;
        haproxy-splice) [[ $kind != tls ]] ;;
        haproxy | nginx) true ;;
        *) false ;;
    esac
}

backend_of() {
    case "$1" in
        tcp-* | pass-* | tls-*) echo sink ;;
        *) echo echo ;;
    esac
}

# --- peer configurations --------------------------------------------------

# write_config PROXY KIND PORT BACKEND_PORT DIR: prints the command to run.
config_haproxy() {
    local kind=$1 port=$2 backend=$3 dir=$4 splice=$5 bind="" route=""
    case "$kind" in
        tls) bind=" ssl crt $PKI/server-full.pem ca-file $PKI/client-ca.pem verify required alpn h2,http/1.1" ;;
        pass) route="    tcp-request inspect-delay 5s
    tcp-request content accept if { req.ssl_hello_type 1 }
    use_backend be if { req.ssl_sni -i bench.example }" ;;
    esac
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread 1
    # Two descriptors per proxied connection, under the 20,000 file limit.
    maxconn 9000
$([[ $splice == 1 ]] && echo '    # Splice pipes take two more each: keep their pool within the limit.
    maxpipes 500')
defaults
    mode tcp
    timeout connect 3s
    timeout client 2h
    timeout server 2h
$([[ $splice == 1 ]] && printf '    option splice-request\n    option splice-response')
frontend fe
    bind 127.0.0.1:$port$bind
$route
    default_backend be
backend be
    server b1 127.0.0.1:$backend
EOF
    echo "haproxy -db -f $dir/haproxy.cfg"
}

config_nginx() {
    local kind=$1 port=$2 backend=$3 dir=$4 server=""
    case "$kind" in
        plain) server="listen 127.0.0.1:$port; proxy_pass 127.0.0.1:$backend;" ;;
        pass) server="listen 127.0.0.1:$port; ssl_preread on; proxy_pass \$upstream;" ;;
        tls) server="listen 127.0.0.1:$port ssl;
        ssl_certificate $PKI/server.pem;
        ssl_certificate_key $PKI/server.key;
        ssl_client_certificate $PKI/client-ca.pem;
        ssl_verify_client on;
        proxy_pass 127.0.0.1:$backend;" ;;
    esac
    cat >"$dir/nginx.conf" <<EOF
load_module $NGINX_STREAM;
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 19000; }
stream {
    map \$ssl_preread_server_name \$upstream {
        bench.example 127.0.0.1:$backend;
        default 127.0.0.1:1;
    }
    server {
        $server
        proxy_connect_timeout 3s;
        proxy_timeout 2h;
    }
}
EOF
    echo "nginx -p $dir -e $dir/nginx-error.log -c $dir/nginx.conf"
}

config_stunnel() {
    local port=$1 backend=$2 dir=$3
    cat >"$dir/stunnel.conf" <<EOF
foreground = yes
pid =
output = $dir/stunnel.log
debug = err
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[bench]
accept = 127.0.0.1:$port
connect = 127.0.0.1:$backend
cert = $PKI/server.pem
key = $PKI/server.key
CAfile = $PKI/client-ca.pem
verifyChain = yes
requireCert = yes
TIMEOUTidle = 7200
EOF
    echo "stunnel4 $dir/stunnel.conf"
}

config_bkpool() {
    local mode=$1 port=$2 backend=$3 dir=$4
    cat >"$dir/bkpool.toml" <<EOF
listen = "127.0.0.1:$port"
admin = "127.0.0.1:$(free_port)"
[limits]
max_connections = 20000
max_handshakes = 1024
[timeouts]
handshake = "10s"
connect = "3s"
idle = "2h"
[[server_cert]]
cert = "$PKI/server.pem"
key = "$PKI/server.key"
[[pool]]
name = "bench"
mode = "$mode"
$([[ $mode == terminate ]] && echo "client_ca = \"$PKI/client-ca.pem\"")
backends = ["127.0.0.1:$backend"]
hostnames = ["bench.example"]
EOF
    echo "$BKPOOL gateway --config $dir/bkpool.toml"
}

proxy_command() {
    local proxy=$1 kind=$2 port=$3 backend=$4 dir=$5
    case "$proxy" in
        haproxy) config_haproxy "$kind" "$port" "$backend" "$dir" 0 ;;
        haproxy-splice) config_haproxy "$kind" "$port" "$backend" "$dir" 1 ;;
        nginx) config_nginx "$kind" "$port" "$backend" "$dir" ;;
        stunnel) config_stunnel "$port" "$backend" "$dir" ;;
        socat) echo "socat TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork,backlog=1024,nodelay TCP:127.0.0.1:$backend,nodelay" ;;
        bkpool-term) config_bkpool terminate "$port" "$backend" "$dir" ;;
        bkpool-pass) config_bkpool passthrough "$port" "$backend" "$dir" ;;
    esac
}

# --- one measured run -----------------------------------------------------

load_args() {
    local scenario=$1 target=$2 pids=$3 kind
    kind=$(kind_of "$scenario")
    local conn=()
    case "$kind" in
        pass) conn=(--client-hello bench.example) ;;
        tls) conn=("${TLS_ARGS[@]}") ;;
    esac
    case "$scenario" in
        tcp-* | pass-* | tls-*)
            echo throughput --target "$target" --conns "${scenario#*-}" --seconds "$RUN_SECONDS" \
                ${pids:+--pid "$pids"} "${conn[@]}" ;;
        hs)
            echo handshakes --target "$target" --concurrency 32 --seconds "$RUN_SECONDS" --pid "$pids" "${conn[@]}" ;;
        lat-*)
            echo latency --target "$target" --rate 10000 --size 1024 --conns 8 --seconds "$RUN_SECONDS" \
                --warmup-seconds "$WARMUP" "${conn[@]}" ;;
        idle)
            echo idle --target "$target" --conns "$IDLE_CONNS" --concurrency 64 --settle-seconds 3 \
                --pid "$pids" "${conn[@]}" ;;
    esac
}

# Appends one JSON line (result or error) to the results file.
run_one() {
    local round=$1 scenario=$2 proxy=$3
    local dir=$WORK/run
    rm -rf "$dir"
    mkdir -p "$dir"
    local backend_port target pids="" skip=()
    backend_port=$(free_port)
    [[ $(kind_of "$scenario") == pass ]] && skip=(--skip-client-hello)
    start 1 "$dir/backend.log" "$LOADGEN" "$(backend_of "$scenario")" \
        --listen "127.0.0.1:$backend_port" --lifetime-seconds 900 "${skip[@]}"
    if ! wait_listening "$backend_port"; then
        record_error "$round" "$scenario" "$proxy" "backend did not start"
        stop_all
        return
    fi
    if [[ $proxy == direct ]]; then
        target=127.0.0.1:$backend_port
    else
        local port command
        port=$(free_port)
        command=$(proxy_command "$proxy" "$(kind_of "$scenario")" "$port" "$backend_port" "$dir")
        # shellcheck disable=SC2086 # the command is split on purpose
        start 0 "$dir/proxy.log" $command
        local proxy_pid=$LAST_PID
        if ! wait_listening "$port"; then
            record_error "$round" "$scenario" "$proxy" "proxy did not start: $(tail -c 300 "$dir/proxy.log" "$dir"/*error.log 2>/dev/null | tr -d '\n')"
            stop_all
            return
        fi
        sleep 0.2 # let nginx fork its worker
        pids=$(pids_of "$proxy_pid")
        # socat forks one process per connection after this point: its CPU
        # cannot be read from here, so it reports none rather than zero.
        [[ $proxy == socat ]] && pids=""
        target=127.0.0.1:$port
    fi
    local args limit
    read -r -a args <<<"$(load_args "$scenario" "$target" "$pids")"
    limit=$(awk -v s="$RUN_SECONDS" -v n="$IDLE_CONNS" 'BEGIN { print int(s + 60 + n / 50) }')
    log "round $round: $scenario via $proxy"
    if timeout "$limit" taskset -c 1 "${BOOST[@]}" "$LOADGEN" "${args[@]}" >"$dir/load.json" 2>"$dir/load.err"; then
        # The 1-minute load average says how busy the machine was around the run.
        printf '{"round":%d,"scenario":"%s","proxy":"%s","loadavg":%s,"result":%s}\n' \
            "$round" "$scenario" "$proxy" "$(cut -d' ' -f1 /proc/loadavg)" \
            "$(tail -n 1 "$dir/load.json")" >>"$RESULTS"
    else
        record_error "$round" "$scenario" "$proxy" "$(tail -c 300 "$dir/load.err")"
    fi
    stop_all
}

record_error() {
    local message
    message=$(printf '%s' "$4" | tr -d '"\\\n\r\t' | tr -c '[:print:]' ' ')
    log "round $1: $2 via $3 failed: $message"
    printf '{"round":%d,"scenario":"%s","proxy":"%s","error":"%s"}\n' "$1" "$2" "$3" "$message" >>"$RESULTS"
}

# --- the comparison -------------------------------------------------------

machine() {
    echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
    echo "- kernel: $(uname -r); $(grep PRETTY_NAME /etc/os-release | cut -d'"' -f2)"
    echo "- haproxy: $(haproxy -v | head -n 1)"
    echo "- nginx: $(nginx -v 2>&1)"
    echo "- stunnel: $(stunnel4 -version 2>&1 | grep -m1 -i '^stunnel')"
    echo "- socat: $(socat -V | grep -m1 'socat version')"
    echo "- openssl: $(openssl version)"
    echo "- bkpool: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$([[ $BKPOOL_OK == 1 ]] || echo ' (gateway not runnable: skipped)')"
}

main() {
    install_peers
    build
    make_certs
    local before after
    before=$(uptime)
    log "results in $OUT; load before: $before"
    local round scenario proxy i n=${#PROXY_LIST[@]}
    for round in $(seq "$ROUNDS"); do
        for scenario in "${SCENARIO_LIST[@]}"; do
            # Rotate the order each round so no proxy always runs first.
            for i in $(seq 0 $((n - 1))); do
                proxy=${PROXY_LIST[$(((i + round - 1) % n))]}
                if applies "$scenario" "$proxy"; then
                    run_one "$round" "$scenario" "$proxy"
                fi
            done
        done
    done
    after=$(uptime)
    {
        echo "# bkpool vs peers: $ROUNDS round(s) of ${RUN_SECONDS}s runs, $(date -u +%Y-%m-%dT%H:%MZ)"
        echo
        echo "Command: \`benches/compare.sh $ORIGINAL_ARGS\`"
        echo
        machine
        echo "- load before: ${before#*load average: }; after: ${after#*load average: } (1, 5, 15 min)"
        echo
        "$LOADGEN" report "$RESULTS"
    } >"$OUT/table.md"
    cat "$OUT/table.md"
    log "written: $OUT/table.md and $OUT/results.jsonl"
}

main
