#!/usr/bin/env bash
# A real single-node Ceph RGW S3 endpoint on loopback, for the external-endpoint
# test tier (tests honour S3KV_TEST_ENDPOINT_URL).
#
#   scripts/ceph_rgw.sh start    install packages if missing, start mon + osd + rgw
#   scripts/ceph_rgw.sh env      print the export line (starts the cluster if needed)
#   scripts/ceph_rgw.sh status   exit 0 when the endpoint answers
#   scripts/ceph_rgw.sh stop     stop the daemons and remove the work dir
#
#   eval "$(scripts/ceph_rgw.sh env)"; .venv/bin/python -m pytest tests/store -q
#
# One monitor, one bluestore OSD on a sparse file, pools of size 1, no cephx,
# the beast frontend on 127.0.0.1. Every command is safe to run twice.
#
# Settings (environment):
#   S3KV_CEPH_DIR         work dir (default .tmp/ceph under the repository)
#   S3KV_CEPH_PORT        S3 port (default: a free port chosen at start)
#   S3KV_CEPH_ACCESS_KEY  access key of the S3 user (default s3kvtestaccesskey)
#   S3KV_CEPH_SECRET_KEY  its secret key (default s3kvtestsecretkey)
#   S3KV_CEPH_TIMEOUT_S   how long start waits for each daemon (default 90)
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${S3KV_CEPH_DIR:-.tmp/ceph}
mkdir -p "$(dirname "$WORK")"
WORK=$(cd "$(dirname "$WORK")" && pwd)/$(basename "$WORK")
ACCESS=${S3KV_CEPH_ACCESS_KEY:-s3kvtestaccesskey}
SECRET=${S3KV_CEPH_SECRET_KEY:-s3kvtestsecretkey}
TIMEOUT=${S3KV_CEPH_TIMEOUT_S:-90}
CONF=$WORK/ceph.conf
PACKAGES=(radosgw ceph-mon ceph-osd ceph-common)

log() { echo "[ceph_rgw] $*" >&2; }
die() { log "error: $*"; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

install_packages() {
  local missing=()
  for bin in radosgw ceph-mon ceph-osd ceph radosgw-admin monmaptool; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y --no-install-recommends "${PACKAGES[@]}" >&2 \
    || { "${sudo[@]}" apt-get update -q >&2 \
         && "${sudo[@]}" apt-get install -y --no-install-recommends "${PACKAGES[@]}" >&2; }
}

pid_alive() {  # pid_alive FILE: the daemon whose pid FILE holds is running
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

s3_port() { cat "$WORK/port" 2>/dev/null || true; }

endpoint_answers() {  # any HTTP answer from the S3 frontend
  local port
  port=$(s3_port)
  [ -n "$port" ] || return 1
  local code
  code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$port/" 2>/dev/null) || return 1
  [ "$code" != "000" ]
}

running() {
  pid_alive "$WORK/run/mon.a.pid" && pid_alive "$WORK/run/osd.0.pid" \
    && pid_alive "$WORK/run/rgw.pid" && endpoint_answers
}

wait_for() {  # wait_for WHAT CMD...: poll CMD until it succeeds, at most $TIMEOUT s
  local what=$1
  shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "$what not ready after ${TIMEOUT}s; logs in $WORK/log"
      tail -n 20 "$WORK"/log/*.log >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
}

daemon() {  # daemon NAME CMD...: run CMD (it forks itself), its start-up chatter to a log
  local name=$1
  shift
  "$@" >>"$WORK/log/$name.out" 2>&1 || {
    tail -n 20 "$WORK/log/$name.out" >&2
    die "$name failed to start; logs in $WORK/log"
  }
}

ceph_cli() { ceph -c "$CONF" --connect-timeout 10 "$@"; }

write_conf() {
  local fsid=$1 mon_v2=$2 mon_v1=$3 port=$4
  cat > "$CONF" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$mon_v2,v1:127.0.0.1:$mon_v1]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
ms mon cluster mode = crc
ms mon service mode = crc
ms mon client mode = crc
ms cluster mode = crc
ms service mode = crc
ms client mode = crc
run dir = $WORK/run
admin socket = $WORK/run/\$name.asok
log file = $WORK/log/\$name.log
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 1
mon data avail crit = 0
osd max object name len = 460
osd max object namespace len = 64

[mon]
mon data = $WORK/mon/\$name
mon cluster log file = $WORK/log/cluster.log

[osd]
osd data = $WORK/osd/\$name
osd objectstore = bluestore
bluestore block path = $WORK/osd/\$name/block.file
bluestore block create = true
bluestore block size = 8589934592
bluestore fsck on mount = false
bluestore fsck on mkfs = false
bluestore cache autotune = false
bluestore cache size = 67108864
osd memory target = 939524096
osd op num shards = 1
osd op num threads per shard = 2

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$port
rgw data = $WORK/rgw
rgw thread pool size = 64
rgw enable usage log = false
rgw dns name = localhost
EOF
}

start() {
  install_packages
  if running; then
    log "already running on port $(s3_port)"
    return 0
  fi
  if [ -d "$WORK" ]; then
    log "stale work dir $WORK: cleaning it first"
    stop
  fi
  local t0=$SECONDS
  mkdir -p "$WORK"/{run,log,mon,osd/osd.0,rgw}
  local port=${S3KV_CEPH_PORT:-$(free_port)}
  local mon_v2 mon_v1 fsid osd_uuid
  mon_v2=$(free_port)
  mon_v1=$(free_port)
  fsid=$(cat /proc/sys/kernel/random/uuid)
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  echo "$port" > "$WORK/port"
  write_conf "$fsid" "$mon_v2" "$mon_v1" "$port"

  log "monitor (v2 $mon_v2, v1 $mon_v1)"
  monmaptool --create --fsid "$fsid" \
    --addv a "[v2:127.0.0.1:$mon_v2,v1:127.0.0.1:$mon_v1]" "$WORK/monmap" >/dev/null
  ceph-authtool --create-keyring "$WORK/mon.keyring" --gen-key -n mon. \
    --cap mon 'allow *' >/dev/null
  daemon mon-mkfs ceph-mon -c "$CONF" --mkfs -i a --monmap "$WORK/monmap" \
    --keyring "$WORK/mon.keyring"
  daemon mon ceph-mon -c "$CONF" -i a --pid-file "$WORK/run/mon.a.pid"
  wait_for "monitor" ceph_cli mon stat

  log "osd"
  local osd_id
  osd_id=$(ceph_cli osd new "$osd_uuid")
  [ "$osd_id" = "0" ] || die "expected osd id 0, got $osd_id"
  daemon osd-mkfs ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid"
  daemon osd ceph-osd -c "$CONF" -i 0 --pid-file "$WORK/run/osd.0.pid"
  wait_for "osd" bash -c "ceph -c '$CONF' --connect-timeout 5 osd dump 2>/dev/null \
    | grep -q '^osd.0 up'"

  log "radosgw on 127.0.0.1:$port"
  daemon rgw radosgw -c "$CONF" -n client.rgw.a --pid-file "$WORK/run/rgw.pid"
  wait_for "radosgw" endpoint_answers

  if ! radosgw-admin -c "$CONF" user info --uid=s3kv >/dev/null 2>&1; then
    radosgw-admin -c "$CONF" user create --uid=s3kv --display-name="s3kv tests" \
      --access-key="$ACCESS" --secret-key="$SECRET" >/dev/null
  fi
  log "ready in $((SECONDS - t0))s: http://127.0.0.1:$port"
}

stop_pid() {  # stop_pid FILE: TERM the daemon, KILL it if it outlives a bounded wait
  local file=$1 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 15))
  while kill -0 "$pid" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
}

stop() {
  [ -d "$WORK" ] || return 0
  stop_pid "$WORK/run/rgw.pid"
  stop_pid "$WORK/run/osd.0.pid"
  stop_pid "$WORK/run/mon.a.pid"
  rm -rf "$WORK"
}

print_env() {
  running || start
  echo "export S3KV_TEST_ENDPOINT_URL=http://127.0.0.1:$(s3_port)" \
    "AWS_ACCESS_KEY_ID=$ACCESS AWS_SECRET_ACCESS_KEY=$SECRET AWS_DEFAULT_REGION=us-east-1"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) print_env ;;
  status) running ;;
  *) echo "usage: $0 start|stop|env|status" >&2; exit 2 ;;
esac
