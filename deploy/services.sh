#!/usr/bin/env bash
# Make sure Redis and RabbitMQ are reachable for asyncloco on this machine.
#
#   bash deploy/services.sh up       reuse running servers, else start installed ones,
#                                    else (root + apt-get) install them, else explain and exit 1
#   bash deploy/services.sh down     stop ONLY the servers that `up` started (never others)
#   bash deploy/services.sh status   print reachable/unreachable per service (exit 3 if one is not)
#
# Environment:
#   ASYNCLOCO_REDIS_PORT (6379), ASYNCLOCO_AMQP_PORT (5672)   ports on 127.0.0.1
#   ASYNCLOCO_REDIS, ASYNCLOCO_AMQP   URLs (redis://host:port/0, amqp://user:pw@host:port/%2F);
#       when set they win over the *_PORT variables. A local host (127.0.0.1, localhost, ::1)
#       is managed as above; any other host is only checked, never started or stopped.
#
# What `up` started is recorded under .asyncloco/services/ in the repo root (gitignored):
# one state file per server with its pid, and for Redis its data dir and log.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
STATE_DIR="$REPO_ROOT/.asyncloco/services"

# rabbitmq-server and its CLI tools live in sbin on Debian and Homebrew.
for d in /usr/local/sbin /usr/sbin /sbin /opt/homebrew/sbin; do
    case ":$PATH:" in *":$d:"*) ;; *) [[ -d $d ]] && PATH="$PATH:$d" ;; esac
done
export PATH

INSTALL_HINT="asyncloco needs Redis and RabbitMQ: install redis-server and rabbitmq-server \
(Debian/Ubuntu: sudo apt-get install redis-server rabbitmq-server; macOS: brew install redis rabbitmq) \
or point ASYNCLOCO_REDIS / ASYNCLOCO_AMQP at running ones"

RABBIT_WAIT_S=60
REDIS_WAIT_S=15

die() {
    echo "services.sh: $*" >&2
    exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

is_root() { [[ $(id -u) -eq 0 ]]; }

# --- endpoints -------------------------------------------------------------------------------

check_port() { # name value
    if [[ ! $2 =~ ^[0-9]{1,5}$ ]] || ((10#$2 < 1 || 10#$2 > 65535)); then
        die "$1 must be a port number, got '$2'"
    fi
}

# parse_url URL DEFAULT_PORT -> sets URL_HOST and URL_PORT (user, password, path are dropped)
parse_url() {
    local rest=${1#*://}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    rest=${rest##*@}
    if [[ $rest == \[* ]]; then # [ipv6]:port
        URL_HOST=${rest%%]*}
        URL_HOST=${URL_HOST#[}
        URL_PORT=${rest#*]}
    else
        URL_HOST=${rest%%:*}
        URL_PORT=${rest#"$URL_HOST"}
    fi
    URL_PORT=${URL_PORT#:}
    URL_PORT=${URL_PORT:-$2}
    URL_HOST=${URL_HOST:-127.0.0.1}
}

is_local_host() {
    case $1 in 127.0.0.1 | localhost | ::1) return 0 ;; *) return 1 ;; esac
}

# Sets REDIS_HOST REDIS_PORT REDIS_MANAGED AMQP_HOST AMQP_PORT AMQP_MANAGED (MANAGED=1: on this
# machine, so `up` may start it; 0: external, only checked).
resolve_endpoints() {
    REDIS_HOST=127.0.0.1 REDIS_PORT=${ASYNCLOCO_REDIS_PORT:-6379} REDIS_MANAGED=1
    AMQP_HOST=127.0.0.1 AMQP_PORT=${ASYNCLOCO_AMQP_PORT:-5672} AMQP_MANAGED=1
    if [[ -n ${ASYNCLOCO_REDIS:-} ]]; then
        case $ASYNCLOCO_REDIS in
            unix:*) die "ASYNCLOCO_REDIS is a unix socket; services.sh only handles TCP (unset it to let services.sh manage Redis)" ;;
            redis://* | rediss://*) ;;
            *) die "ASYNCLOCO_REDIS must be a redis:// URL" ;;
        esac
        parse_url "$ASYNCLOCO_REDIS" 6379
        REDIS_PORT=$URL_PORT
        if is_local_host "$URL_HOST"; then REDIS_HOST=127.0.0.1; else REDIS_HOST=$URL_HOST REDIS_MANAGED=0; fi
    fi
    if [[ -n ${ASYNCLOCO_AMQP:-} ]]; then
        case $ASYNCLOCO_AMQP in
            amqp://*) parse_url "$ASYNCLOCO_AMQP" 5672 ;;
            amqps://*) parse_url "$ASYNCLOCO_AMQP" 5671 ;;
            *) die "ASYNCLOCO_AMQP must be an amqp:// URL" ;;
        esac
        AMQP_PORT=$URL_PORT
        if is_local_host "$URL_HOST"; then AMQP_HOST=127.0.0.1; else AMQP_HOST=$URL_HOST AMQP_MANAGED=0; fi
    fi
    check_port "Redis port" "$REDIS_PORT"
    check_port "RabbitMQ port" "$AMQP_PORT"
    REDIS_PORT=$((10#$REDIS_PORT))
    AMQP_PORT=$((10#$AMQP_PORT))
    REDIS_STATE="$STATE_DIR/redis-$REDIS_PORT.state"
    AMQP_STATE="$STATE_DIR/rabbitmq-$AMQP_PORT.state"
}

# --- probes ----------------------------------------------------------------------------------

tcp_open() { # host port: does something accept TCP connections there?
    local port=$2
    if have python3; then
        python3 - "$1" "$port" <<'PY' 2>/dev/null
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
except OSError:
    sys.exit(1)
PY
    elif have timeout; then
        # shellcheck disable=SC2016 # $0 and $1 are expanded by the inner bash
        timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$port" 2>/dev/null
    else
        # shellcheck disable=SC2016
        bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$port" 2>/dev/null
    fi
}

redis_up() {
    tcp_open "$REDIS_HOST" "$REDIS_PORT" || return 1
    # Something listens; if redis-cli is around, make sure it is Redis. A password-protected
    # Redis answers NOAUTH, which still proves it is Redis.
    if have redis-cli; then
        local reply
        reply=$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>&1 </dev/null || true)
        [[ $reply == PONG || $reply == *NOAUTH* || $reply == *WRONGPASS* ]] || return 2
    fi
}

amqp_up() { tcp_open "$AMQP_HOST" "$AMQP_PORT"; }

# --- state files -----------------------------------------------------------------------------

state_get() { # file key
    [[ -f $1 ]] || return 0
    sed -n "s/^$2=//p" "$1" 2>/dev/null | head -n 1
}

pid_alive() { [[ $1 =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null; }

pid_is() { # pid pattern: is pid alive and does its command line match *pattern*?
    pid_alive "$1" || return 1
    local args
    args=$(ps -p "$1" -o args= 2>/dev/null || true)
    [[ $args == *"$2"* ]]
}

wait_pid_gone() { # pid seconds
    local i
    for ((i = 0; i < $2 * 5; i++)); do
        pid_alive "$1" || return 0
        sleep 0.2
    done
    ! pid_alive "$1"
}

started_by_us() { # state-file pattern: prints the pid if the recorded process is still ours
    local pid
    [[ -f $1 ]] || return 1
    pid=$(state_get "$1" pid)
    if pid_is "$pid" "$2"; then
        echo "$pid"
    else
        rm -f "$1" # stale: what we started is gone
        return 1
    fi
}

# --- install ---------------------------------------------------------------------------------

install_packages() { # debian package names
    if is_root && have apt-get; then
        echo "services.sh: installing $* from the OS packages (apt-get) ..." >&2
        if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2; then
            hash -r
            return 0
        fi
        die "apt-get install $* failed (see above). $INSTALL_HINT"
    fi
    die "$INSTALL_HINT (missing here: $*)"
}

# --- Redis -----------------------------------------------------------------------------------

redis_start() {
    local dir="$STATE_DIR/redis-$REDIS_PORT" bind=(127.0.0.1) major pid i
    mkdir -p "$dir"
    # Redis 7 understands "-::1" (bind IPv6 loopback if there is one); older versions do not.
    major=$(redis-server --version 2>/dev/null | sed -n 's/.*v=\([0-9]*\).*/\1/p')
    if [[ ${major:-0} -ge 7 ]]; then bind+=(-::1); fi
    redis-server --daemonize yes --bind "${bind[@]}" --port "$REDIS_PORT" \
        --save "" --appendonly no --dir "$dir" --logfile "$dir/redis.log" \
        --pidfile "$dir/redis.pid" >/dev/null 9>&- ||
        die "redis-server failed to start; see $dir/redis.log"
    for ((i = 0; i < REDIS_WAIT_S * 5; i++)); do
        if redis_up && [[ -s $dir/redis.pid ]]; then break; fi
        sleep 0.2
    done
    redis_up || die "redis-server did not come up on 127.0.0.1:$REDIS_PORT within ${REDIS_WAIT_S}s; see $dir/redis.log"
    pid=$(cat "$dir/redis.pid")
    printf 'pid=%s\nport=%s\ndir=%s\nlog=%s\n' "$pid" "$REDIS_PORT" "$dir" "$dir/redis.log" >"$REDIS_STATE"
    echo "redis     127.0.0.1:$REDIS_PORT  started (pid $pid, log $dir/redis.log)"
}

redis_ensure() {
    local where="$REDIS_HOST:$REDIS_PORT" rc=0 pid
    redis_up || rc=$?
    if ((rc == 0)); then
        if pid=$(started_by_us "$REDIS_STATE" redis-server); then
            echo "redis     $where  reused (started earlier by services.sh, pid $pid)"
        else
            echo "redis     $where  reused (already running)"
        fi
        return
    fi
    ((rc == 2)) && die "$where accepts connections but does not answer like Redis; free the port or choose another (ASYNCLOCO_REDIS_PORT / ASYNCLOCO_REDIS)"
    ((REDIS_MANAGED)) || die "Redis at $where (ASYNCLOCO_REDIS) is unreachable"
    redis_start
}

redis_stop() {
    local pid
    if ! pid=$(started_by_us "$REDIS_STATE" redis-server); then
        echo "redis     127.0.0.1:$REDIS_PORT  left alone (not started by services.sh)"
        return
    fi
    # SIGTERM: Redis shuts down cleanly (and saves nothing, as we started it with --save "").
    kill -TERM "$pid"
    wait_pid_gone "$pid" 15 || die "redis-server (pid $pid) did not stop within 15s"
    rm -f "$REDIS_STATE"
    echo "redis     127.0.0.1:$REDIS_PORT  stopped (pid $pid)"
}

# --- RabbitMQ --------------------------------------------------------------------------------

# The node that serves AMQP_PORT: the installation's default node for 5672 (configured by
# /etc/rabbitmq as usual); for any other port a separate node named asyncloco-PORT with a
# generated config, so it never collides with a system broker.
rabbit_node_args() {
    RABBIT_NODE_ARGS=()
    local node
    node=$(state_get "$AMQP_STATE" node)
    if [[ -n $node ]]; then RABBIT_NODE_ARGS=(-n "$node"); fi
}

rabbit_start() {
    local log="$STATE_DIR/rabbitmq-$AMQP_PORT.start.log" conf_dir="" node="" pid="" i
    local -a env=()
    : >"$log"
    if ((AMQP_PORT != 5672)); then
        # The system rabbitmq.conf may pin listeners to 5672 and would win over
        # RABBITMQ_NODE_PORT, so give this node a config of its own. It lives in a private
        # /tmp dir because the Debian wrapper runs the broker as the rabbitmq user, who may not
        # be able to read the repo.
        conf_dir=$(mktemp -d "${TMPDIR:-/tmp}/asyncloco-rabbitmq.XXXXXX")
        chmod 755 "$conf_dir"
        printf 'listeners.tcp.1 = 127.0.0.1:%s\n' "$AMQP_PORT" >"$conf_dir/rabbitmq.conf"
        chmod 644 "$conf_dir/rabbitmq.conf"
        node="asyncloco-$AMQP_PORT@localhost"
        # No plugins: an enabled management plugin would clash with the system broker's.
        echo '[].' >"$conf_dir/enabled_plugins"
        chmod 644 "$conf_dir/enabled_plugins"
        env=(RABBITMQ_NODENAME="$node" RABBITMQ_CONFIG_FILE="$conf_dir/rabbitmq.conf"
            RABBITMQ_ENABLED_PLUGINS_FILE="$conf_dir/enabled_plugins" RABBITMQ_NODE_PORT="$AMQP_PORT")
    fi
    # 9>&-: the daemon must not inherit (and so hold forever) our lock file.
    if ! env ${env[@]+"${env[@]}"} rabbitmq-server -detached >>"$log" 2>&1 9>&-; then
        [[ -n $conf_dir ]] && rm -rf "$conf_dir"
        if ! is_root && grep -q "Only root or rabbitmq" "$log"; then
            die "RabbitMQ is installed but only root may start it here: run 'sudo systemctl start rabbitmq-server' (or this script with sudo)"
        fi
        die "rabbitmq-server failed to start; see $log and the RabbitMQ logs (/var/log/rabbitmq on Debian)"
    fi
    # Record at once, so that `down` can clean up even if the wait below fails.
    printf 'pid=\nport=%s\nnode=%s\nconf_dir=%s\n' "$AMQP_PORT" "$node" "$conf_dir" >"$AMQP_STATE"
    rabbit_node_args
    for ((i = 0; i < RABBIT_WAIT_S; i++)); do
        amqp_up && break
        sleep 1
    done
    amqp_up || die "RabbitMQ did not accept connections on 127.0.0.1:$AMQP_PORT within ${RABBIT_WAIT_S}s; see $log and the RabbitMQ logs (/var/log/rabbitmq on Debian)"
    rabbitmq-diagnostics -q ${RABBIT_NODE_ARGS[@]+"${RABBIT_NODE_ARGS[@]}"} check_port_connectivity >>"$log" 2>&1 ||
        rabbitmq-diagnostics -q ${RABBIT_NODE_ARGS[@]+"${RABBIT_NODE_ARGS[@]}"} ping >>"$log" 2>&1 ||
        die "RabbitMQ listens on 127.0.0.1:$AMQP_PORT but fails its health check; see $log"
    # The Erlang VM's OS pid, so that `down` stops exactly this broker and no later one.
    pid=$(rabbitmqctl -q ${RABBIT_NODE_ARGS[@]+"${RABBIT_NODE_ARGS[@]}"} eval 'os:getpid().' 2>>"$log" | tr -dc '0-9')
    printf 'pid=%s\nport=%s\nnode=%s\nconf_dir=%s\n' "$pid" "$AMQP_PORT" "$node" "$conf_dir" >"$AMQP_STATE"
    echo "rabbitmq  127.0.0.1:$AMQP_PORT  started (pid ${pid:-?}${node:+, node $node}; guest/guest works on localhost)"
}

rabbit_ensure() {
    local where="$AMQP_HOST:$AMQP_PORT" pid
    if amqp_up; then
        if pid=$(started_by_us "$AMQP_STATE" beam); then
            echo "rabbitmq  $where  reused (started earlier by services.sh, pid $pid)"
        else
            echo "rabbitmq  $where  reused (already running)"
        fi
        return
    fi
    ((AMQP_MANAGED)) || die "RabbitMQ at $where (ASYNCLOCO_AMQP) is unreachable"
    rabbit_start
}

rabbit_stop() {
    local pid conf_dir
    if ! pid=$(started_by_us "$AMQP_STATE" beam); then
        echo "rabbitmq  127.0.0.1:$AMQP_PORT  left alone (not started by services.sh)"
        return
    fi
    rabbit_node_args
    conf_dir=$(state_get "$AMQP_STATE" conf_dir)
    # shutdown stops the broker and its Erlang VM and waits for it.
    rabbitmqctl -q ${RABBIT_NODE_ARGS[@]+"${RABBIT_NODE_ARGS[@]}"} shutdown >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    wait_pid_gone "$pid" 60 || die "RabbitMQ (pid $pid) did not stop within 60s"
    if [[ -n $conf_dir && $conf_dir == */asyncloco-rabbitmq.* ]]; then rm -rf "$conf_dir"; fi
    rm -f "$AMQP_STATE"
    echo "rabbitmq  127.0.0.1:$AMQP_PORT  stopped (pid $pid)"
}

# --- commands --------------------------------------------------------------------------------

cmd_up() {
    local -a missing=()
    local redis_rc=0
    redis_up || redis_rc=$?
    if ((redis_rc == 1 && REDIS_MANAGED)) && ! have redis-server; then missing+=(redis-server); fi
    if ((AMQP_MANAGED)) && ! amqp_up && ! have rabbitmq-server; then missing+=(rabbitmq-server); fi
    if ((${#missing[@]})); then
        install_packages ${missing[@]+"${missing[@]}"}
        # A package may have started its own system service (systemd); give it a moment so
        # that we reuse it instead of starting a second copy.
        if have systemctl && [[ -d /run/systemd/system ]]; then
            local i
            for ((i = 0; i < 30; i++)); do
                redis_up && amqp_up && break
                sleep 1
            done
        fi
    fi
    redis_ensure
    rabbit_ensure
    rabbit_management
}

# `asyncloco-coordinator invite` creates each volunteer's broker user through RabbitMQ's
# management API (coordinator/broker_admin.py), so the broker this script manages on 5672 gets the
# rabbitmq_management plugin (port 15672, localhost only for guest). A private node on another port
# and a remote broker are left as they are: their operator enables it.
rabbit_management() {
    ((AMQP_MANAGED)) && [[ $AMQP_PORT == 5672 ]] || return 0
    (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null && return 0
    if ! have rabbitmq-plugins; then
        echo "rabbitmq  management API unavailable (no rabbitmq-plugins): 'invite' needs it"
        return 0
    fi
    if ! rabbitmq-plugins -q enable --online rabbitmq_management >/dev/null 2>&1; then
        echo "rabbitmq  could not enable rabbitmq_management (as root: rabbitmq-plugins enable rabbitmq_management); 'invite' needs it"
        return 0
    fi
    local i
    for ((i = 0; i < 60; i++)); do
        (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null && break
        sleep 0.5
    done
    echo "rabbitmq  management API on 127.0.0.1:15672 enabled (for 'asyncloco-coordinator invite')"
}

cmd_down() {
    redis_stop
    rabbit_stop
}

cmd_status() {
    local ok=0 rc note
    for svc in redis rabbitmq; do
        rc=0
        note=""
        if [[ $svc == redis ]]; then
            redis_up || rc=$?
            printf 'redis     %-22s' "$REDIS_HOST:$REDIS_PORT"
            if [[ -f $REDIS_STATE ]] && pid_is "$(state_get "$REDIS_STATE" pid)" redis-server; then
                note=" (started by services.sh, pid $(state_get "$REDIS_STATE" pid))"
            fi
        else
            amqp_up || rc=$?
            printf 'rabbitmq  %-22s' "$AMQP_HOST:$AMQP_PORT"
            if [[ -f $AMQP_STATE ]] && pid_is "$(state_get "$AMQP_STATE" pid)" beam; then
                note=" (started by services.sh, pid $(state_get "$AMQP_STATE" pid))"
            fi
        fi
        case $rc in
            0) echo " reachable$note" ;;
            2) echo " unreachable (port taken by something that is not Redis)" && ok=1 ;;
            *) echo " unreachable" && ok=1 ;;
        esac
    done
    return $((ok ? 3 : 0))
}

usage() {
    echo "usage: bash deploy/services.sh up|down|status" >&2
    exit 2
}

main() {
    [[ $# -eq 1 ]] || usage
    case $1 in up | down | status) ;; *) usage ;; esac
    resolve_endpoints
    mkdir -p "$STATE_DIR"
    # One services.sh at a time (two `make test` in parallel must not both start a Redis).
    if have flock && { exec 9>"$STATE_DIR/.lock"; } 2>/dev/null; then
        flock -w 120 9 || die "another services.sh holds $STATE_DIR/.lock"
    fi
    "cmd_$1"
}

main "$@"
