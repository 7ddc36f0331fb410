# Shared by the bench/ scripts: builds, temporary directory, process cleanup, ports, and the
# processes every scenario uses (control plane, sidecars, the fixed 1 KiB upstream, HAProxy,
# nginx). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
need() { # command package
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    pkill -x nginx 2>/dev/null || true # Debian's package may start one; ours run on loopback ports
  else echo "$1 missing (Debian package $2)" >&2; exit 1; fi
}
build() {
  cargo build --release --locked -p weft -p weft-proxy >/dev/null 2>&1
  cargo build --release --locked -p weft-test --example bench --example latency >/dev/null 2>&1
  cargo build --profile sidecar --locked -p weft-proxy --bin weft-sidecar >/dev/null 2>&1
}
W=$ROOT/target/release/weft
# Sidecars run as the proxy-only executable: the flags of `weft proxy`, without the control
# plane's, CLI's and dashboard's code among the proxy's pages, built with the `sidecar`
# profile (whole-program optimisation; Cargo.toml) as it ships (issue #15). SIDECAR=path runs
# another build, e.g. target/release/weft-sidecar to compare.
S=${SIDECAR:-$ROOT/target/sidecar/weft-sidecar}
B=$ROOT/target/release/examples/bench
T=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ok() { for _ in $(seq 1 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "not up: $1" >&2; exit 1; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }
ticks=$(getconf CLK_TCK)
cpu_seconds() { awk -v t="$ticks" '{print ($14+$15)/t}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
steal_ticks() { awk '/^cpu / {print $9}' /proc/stat; }
anon_kib() { awk '/^RssAnon:/ {print $2}' "/proc/$1/status"; }

# The fixed 1 KiB upstream, on core $1 (optional).
start_upstream() {
  UP=$(port)
  ${1:+taskset -c $1} "$B" upstream 127.0.0.1:$UP >"$T/upstream.log" 2>&1 & PIDS+=($!)
  wait_port "$UP"
}

# Control plane [extra flags...] -> API GRPC API_URL GRPC_URL CA CONTROL_PID. TLS (the mesh CA,
# trusted through the ca.pem it writes) unless CONTROL_PLAINTEXT=1 (--insecure-plaintext).
start_control() {
  API=$(port); GRPC=$(port)
  local flags=() scheme=https
  [ "${CONTROL_PLAINTEXT:-0}" = 1 ] && { flags=(--insecure-plaintext); scheme=http; }
  rm -rf "$T/control"
  "$W" control --data-dir "$T/control" --api 127.0.0.1:$API --grpc 127.0.0.1:$GRPC "${flags[@]}" "$@" >"$T/control.log" 2>&1 & PIDS+=($!)
  CONTROL_PID=${PIDS[-1]}
  API_URL=$scheme://127.0.0.1:$API; GRPC_URL=$scheme://127.0.0.1:$GRPC; CA=$T/control/ca.pem
  for _ in $(seq 1 200); do
    if [ -f "$CA" ] && curl -fs --cacert "$CA" -o /dev/null "$API_URL/ready"; then
      # The bootstrap admin token: the CLI, curl and the simulator read WEFT_API_TOKEN.
      export WEFT_API_TOKEN; WEFT_API_TOKEN=$(cat "$T/control/admin.token")
      return 0
    fi
    sleep 0.05
  done
  echo "not up: $API_URL" >&2; exit 1
}
# The CLI and curl against the control plane of start_control.
weft_cli() { "$W" --server "$API_URL" --ca-file "$CA" "$@"; }
api_post() { curl -fs --cacert "$CA" -H "Authorization: Bearer $WEFT_API_TOKEN" -XPOST --data-binary @- "$API_URL$1"; } # body on stdin

# start_proxy NAME APP [extra proxy args...] -> IN OUT ADM PROXY_PID. PIN=core pins it.
start_proxy() {
  IN=$(port); OUT=$(port); ADM=$(port)
  local name=$1 app=$2; shift 2
  local tok; tok=$(weft_cli token create --workload "default/$name" --service-account "$name")
  [ "${CONTROL_PLAINTEXT:-0}" = 1 ] && set -- --insecure-plaintext "$@"
  WEFT_TOKEN=$tok ${PIN:+taskset -c $PIN} "$S" --control "$GRPC_URL" --workload "default/$name" --cluster a --app "$app" \
    --inbound 127.0.0.1:$IN --outbound 127.0.0.1:$OUT --admin 127.0.0.1:$ADM "$@" >"$T/$name.log" 2>&1 & PIDS+=($!)
  PROXY_PID=${PIDS[-1]}
  wait_ok "http://127.0.0.1:$ADM/ready"
}

# Self-signed root and leaves for HAProxy's TLS pair.
haproxy_pki() {
  ( cd "$T"
    openssl ecparam -name prime256v1 -genkey -noout -out root.key 2>/dev/null
    openssl req -x509 -new -key root.key -subj /CN=bench-root -days 2 -out root.pem \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    for n in hap-client hap-server; do
      openssl ecparam -name prime256v1 -genkey -noout -out "$n.key" 2>/dev/null
      openssl req -new -key "$n.key" -subj "/CN=$n" -out "$n.csr" 2>/dev/null
      printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n' "$n" >"$n.ext"
      openssl x509 -req -in "$n.csr" -CA root.pem -CAkey root.key -CAcreateserial -days 1 -out "$n.pem" -extfile "$n.ext" 2>/dev/null
      cat "$n.pem" "$n.key" >"$n-full.pem"
    done )
}
hap_global() { printf 'global\n  nbthread 1\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n  mode http\n  option http-keep-alive\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n'; }
# start_haproxy NAME CONFIG-BODY -> HAP_PID (PIN=core pins it)
start_haproxy() {
  { hap_global; printf '%s\n' "$2"; } >"$T/$1.cfg"
  ${PIN:+taskset -c $PIN} haproxy -db -f "$T/$1.cfg" >"$T/$1.log" 2>&1 & PIDS+=($!)
  HAP_PID=${PIDS[-1]}
}
# start_nginx LISTEN-PORT UPSTREAM-PORT -> NGINX_PID: one worker, proxying with kept-alive
# upstream connections.
start_nginx() {
  mkdir -p "$T/nginx"
  cat >"$T/nginx/nginx.conf" <<CFG
worker_processes 1;
daemon off;
error_log $T/nginx/error.log warn;
pid $T/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $T/nginx; proxy_temp_path $T/nginx; fastcgi_temp_path $T/nginx; uwsgi_temp_path $T/nginx; scgi_temp_path $T/nginx;
  # nginx closes a client connection after 1,000 requests by default; neither HAProxy nor weft
  # does, and the load generator counts a request caught by that close as an error.
  keepalive_requests 100000000;
  upstream app { server 127.0.0.1:$2; keepalive 64; }
  server {
    listen 127.0.0.1:$1;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CFG
  ${PIN:+taskset -c $PIN} nginx -c "$T/nginx/nginx.conf" >"$T/nginx/out.log" 2>&1 & PIDS+=($!)
  NGINX_PID=${PIDS[-1]}
  wait_port "$1"
}
