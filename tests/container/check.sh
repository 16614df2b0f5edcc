#!/usr/bin/env bash
# Builds the relay's image and runs it the way the README's "Running in a container" says,
# checking what an operator relies on: mail through a published port reaches the (embedded)
# SES sandbox, the user is 10001, the health check follows the admin port, a root-owned or
# missing volume gives one clear line, a read-only root works, stop ends cleanly within the
# documented 40 s, and mail queued by one container is delivered by its replacement.
# Not part of the default CI run: it needs an image engine (podman or docker). Run as root
# on a fresh machine it installs podman, runc and debootstrap from Debian's packages and
# configures podman; with no image registry reachable it builds a stand-in python:3.11-slim
# from Debian's packages (standin-base.sh) and says so.
#   bash tests/container/check.sh
# ENGINE=podman|docker picks the engine; RELAY_CHECK_IMAGE the tag it builds (localhost/relay:check);
# RELAY_CHECK_NO_CACHE=1 builds from scratch. Every container, volume and directory this
# script makes is removed at the end; every wait is bounded.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
image=${RELAY_CHECK_IMAGE:-localhost/relay:check}
base=docker.io/library/python:3.11-slim
probe() { python3 "$here/probe.py" "$@"; }

passed=0 failed=0 skipped=0
why=""
containers=() volumes=()
work=$(mktemp -d /var/tmp/relay-check.XXXXXX)
chmod 755 "$work"
seq_no=0

say() { echo "check.sh: $*"; }
die() { echo "check.sh: $*" >&2; exit 2; }

# the engine, without podman's complaints about systemd timers for health checks (this
# script runs the health check itself)
eng() { "$ENGINE" "$@" 2> >(grep -v -e 'systemd connection' -e 'unable to get systemd' >&2); }

cleanup() {
    local c v
    for c in "${containers[@]}"; do
        timeout 60 "$ENGINE" rm -f -v -t 5 "$c" > /dev/null 2>&1  # -v: anonymous volumes too
    done
    for v in "${volumes[@]}"; do
        timeout 60 "$ENGINE" volume rm -f "$v" > /dev/null 2>&1
    done
    rm -rf "$work"
}
trap cleanup EXIT

# names in globals, not $(...): a subshell would lose the count and the cleanup list
fresh() { seq_no=$((seq_no + 1)); NAME="relay-check-$$-$seq_no"; }
new_volume() {
    fresh
    eng volume create "$NAME" > /dev/null || return 1
    volumes+=("$NAME"); VOL=$NAME
}

# every relay container: loopback-only published ports, no instance-metadata lookups
start() {  # start NAME ENGINE-ARGS... -- RELAY-ARGS...
    local n=$1; shift
    local args=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do args+=("$1"); shift; done
    [ "${1:-}" = -- ] && shift
    containers+=("$n")
    eng run -d --name "$n" --stop-timeout 40 -e AWS_EC2_METADATA_DISABLED=true \
        "${args[@]}" "$image" "$@" > /dev/null
}

logs() { eng logs "$1" 2>&1; }
in_spool() {  # in_spool CONTAINER COMMAND: a shell command in the container's spool
    eng exec "$1" sh -c "cd /var/spool/relay && $2"
}
count_mail() { in_spool "$1" 'ls sandbox-mail 2>/dev/null | wc -l'; }
exit_code() { eng inspect "$1" --format '{{.State.ExitCode}}'; }

wait_for() {  # wait_for SECONDS COMMAND...: every 0.5 s until it succeeds
    local deadline=$((SECONDS + $1)) i; shift
    for ((i = 0; i < 400; i++)); do
        "$@" > /dev/null 2>&1 && return 0
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.5
    done
    return 1
}
has_mail() { [ "$(count_mail "$1")" -ge "${2:-1}" ]; }
log_has() { logs "$1" | grep -q -- "$2"; }

check() {  # check "a sentence" FUNCTION
    why=""
    if "$2"; then
        passed=$((passed + 1)); echo "PASS $1"
    else
        failed=$((failed + 1)); echo "FAIL $1: $why"
    fi
}
skip() { skipped=$((skipped + 1)); echo "SKIP $1: $2"; }

# -- the engine -------------------------------------------------------------------------

setup_engine() {
    if [ -z "${ENGINE:-}" ]; then
        if command -v docker > /dev/null && docker info > /dev/null 2>&1; then
            ENGINE=docker
        else
            ENGINE=podman
        fi
    fi
    local need=()
    command -v "$ENGINE" > /dev/null || need+=("$ENGINE")
    [ "$ENGINE" = podman ] && ! command -v runc > /dev/null && need+=(runc)
    command -v debootstrap > /dev/null || need+=(debootstrap)
    if [ ${#need[@]} -gt 0 ]; then
        [ "$(id -u)" = 0 ] || die "missing ${need[*]}: install them, or run as root"
        say "installing ${need[*]} from Debian's packages"
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q "${need[@]}" \
            > "$work/apt.log" 2>&1 || {
            timeout 300 apt-get update -q > /dev/null 2>&1
            DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q "${need[@]}" \
                > "$work/apt.log" 2>&1 || { tail "$work/apt.log"; die "apt-get install failed"; }
        }
    fi
    if [ "$ENGINE" = podman ] && [ "$(id -u)" = 0 ] && [ ! -e /etc/containers/containers.conf ]; then
        # podman's default ulimits are above this machine's hard limits (runc then cannot
        # set them), and runc is the runtime that works here
        local nofile nproc
        nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] || [ "$nofile" -gt 16384 ] && nofile=16384
        nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ] && nproc=4096
        mkdir -p /etc/containers
        cat > /etc/containers/containers.conf <<EOF
# written by the relay's tests/container/check.sh: limits no higher than the host's
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
        say "wrote /etc/containers/containers.conf (runc, nofile=$nofile, nproc=$nproc)"
    fi
    say "engine: $("$ENGINE" --version)"
}

setup_base() {
    if eng image inspect "$base" > /dev/null 2>&1; then
        say "base image: $base (already here)"
        return
    fi
    if timeout 60 "$ENGINE" pull -q "$base" > /dev/null 2>&1; then
        say "base image: $base (pulled)"
        return
    fi
    say "no image registry reachable: building a stand-in $base from Debian's packages"
    [ "$(id -u)" = 0 ] || die "the stand-in base needs root (debootstrap)"
    bash "$here/standin-base.sh" "$ENGINE" "$base" || die "stand-in base failed"
}

build() {
    local args=(--build-arg "REVISION=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
                --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
    [ "$ENGINE" = podman ] && args+=(--format docker)   # HEALTHCHECK is a Docker-format field
    [ "${RELAY_CHECK_NO_CACHE:-0}" = 1 ] && args+=(--no-cache)
    local t0=$SECONDS
    say "building $image"
    eng build "${args[@]}" -t "$image" "$repo" > "$work/build.log" 2>&1 || {
        tail -30 "$work/build.log"; die "image build failed"
    }
    local size
    size=$(eng image inspect "$image" --format '{{.Size}}')
    local how="with the layer cache"
    [ "${RELAY_CHECK_NO_CACHE:-0}" = 1 ] && how="from scratch"
    say "built in $((SECONDS - t0)) s ($how), image size $((size / 1000000)) MB ($size bytes)"
}

# -- the checks ---------------------------------------------------------------------------

t_code_change_keeps_dependency_layer() {
    local ctx=$work/context args=()
    mkdir "$ctx"  # cp -a: the same files, modes and times as the tree
    cp -a "$repo"/{Dockerfile,.dockerignore,constraints.txt,pyproject.toml,README.md,relay,conf,deploy} "$ctx"/
    [ "$ENGINE" = podman ] && args+=(--format docker)
    # a build of the tree as it is, then one after a code change: the second must reuse
    # the first's dependency layer (its own build, so a --no-cache build above is no matter)
    eng build "${args[@]}" -t "$image-before" "$ctx" > "$work/before.log" 2>&1 \
        || { why="build failed: $(tail -3 "$work/before.log")"; return 1; }
    echo "# a code change" >> "$ctx/relay/__init__.py"
    eng build "${args[@]}" --build-arg CREATED=later -t "$image-after" "$ctx" \
        > "$work/rebuild.log" 2>&1 || { why="rebuild failed: $(tail -3 "$work/rebuild.log")"; return 1; }
    eng rmi "$image-before" "$image-after" > /dev/null 2>&1
    # podman prints "--> Using cache" after a cached step, BuildKit "CACHED" on the step
    grep -A1 'RUN python3 -m venv' "$work/rebuild.log" | grep -q -e 'Using cache' -e CACHED \
        || { why="the dependency layer was rebuilt after a code change"; return 1; }
    ! grep -A1 'RUN pip install -q --no-deps' "$work/rebuild.log" | grep -q -e 'Using cache' -e CACHED \
        || { why="the relay's own layer was not rebuilt after a code change"; return 1; }
}

t_user() {
    local user uid
    user=$(eng image inspect "$image" --format '{{.Config.User}}')
    [ "$user" = 10001:10001 ] || { why="image user is '$user', not 10001:10001"; return 1; }
    uid=$(eng run --rm --entrypoint id "$image" -u):$(eng run --rm --entrypoint id "$image" -g)
    [ "$uid" = 10001:10001 ] || { why="the process runs as $uid"; return 1; }
}

t_labels_and_healthcheck() {
    local rev start
    rev=$(eng image inspect "$image" --format '{{index .Config.Labels "org.opencontainers.image.revision"}}')
    [ -n "$rev" ] && [ "$rev" != unknown ] || { why="no org.opencontainers.image.revision label"; return 1; }
    start=$(eng image inspect "$image" --format '{{.Config.Healthcheck.StartPeriod}}')
    [ -n "$start" ] && [ "$start" != 0 ] && [ "$start" != "<no value>" ] \
        || { why="the health check has no start period ($start)"; return 1; }
}

REFUSED_LOG=""
t_published_port_refused() {
    local c v port reply
    fresh; c=$NAME; new_volume || return 1; v=$VOL; port=$(probe port)
    start "$c" -v "$v:/var/spool/relay" -p "127.0.0.1:$port:2525" \
        -e RELAY_SES__ENDPOINT_URL=sandbox || { why="container did not start"; return 1; }
    wait_for 60 log_has "$c" '"listening"' || { why="relay never listened"; return 1; }
    reply=$(probe smtp "$port")
    REFUSED_LOG=$(logs "$c" | grep '"refused"')
    eng rm -f -t 5 "$c" > /dev/null
    case $reply in 554*) ;; *) why="expected 554 without smtp.allowed_networks, got: $reply"; return 1;; esac
    echo "$REFUSED_LOG" | grep -q 'smtp.allowed_networks' \
        || { why="the refused line does not name smtp.allowed_networks: $REFUSED_LOG"; return 1; }
}

t_published_port_delivers() {
    local c v port reply
    fresh; c=$NAME; new_volume || return 1; v=$VOL; port=$(probe port)
    start "$c" -v "$v:/var/spool/relay" -p "127.0.0.1:$port:2525" \
        -e RELAY_SES__ENDPOINT_URL=sandbox -e "RELAY_SMTP__ALLOWED_NETWORKS=$NETWORK" \
        || { why="container did not start"; return 1; }
    wait_for 60 log_has "$c" '"listening"' || { why="relay never listened"; return 1; }
    reply=$(probe smtp "$port")
    case $reply in 250*) ;; *) why="expected 250 with RELAY_SMTP__ALLOWED_NETWORKS=$NETWORK, got: $reply"; return 1;; esac
    wait_for 30 has_mail "$c" || { why="accepted ($reply) but nothing in sandbox-mail after 30 s"; return 1; }
    eng rm -f -t 5 "$c" > /dev/null
}

healthy() {  # the image's own health check, as the engine runs it
    if [ "$ENGINE" = podman ]; then
        eng healthcheck run "$1" > /dev/null
    else
        eng exec "$1" relay-healthcheck > /dev/null
    fi
}

t_healthcheck_env_port() {
    local c v
    fresh; c=$NAME; new_volume || return 1; v=$VOL
    start "$c" -v "$v:/var/spool/relay" -e RELAY_SES__ENDPOINT_URL=sandbox \
        -e RELAY_ADMIN__PORT=9025 || { why="container did not start"; return 1; }
    wait_for 60 healthy "$c" || { why="health check not passing on admin port 9025 after 60 s"; return 1; }
    # the same probe aimed at the image's old fixed port must fail: it follows the port
    if eng exec -e RELAY_ADMIN__PORT=8025 "$c" relay-healthcheck > /dev/null 2>&1; then
        why="a probe of 8025 passed too: the check does not tell the ports apart"; return 1
    fi
    eng rm -f -t 5 "$c" > /dev/null
}

t_healthcheck_config_port() {
    local c v
    fresh; c=$NAME; new_volume || return 1; v=$VOL
    printf '[admin]\nport = 9125\n\n[ses]\nendpoint_url = "sandbox"\n' > "$work/relay.toml"
    chmod 644 "$work/relay.toml"
    start "$c" -v "$v:/var/spool/relay" -v "$work/relay.toml:/etc/relay/relay.toml:ro" \
        || { why="container did not start"; return 1; }
    wait_for 60 healthy "$c" || { why="health check not passing on admin.port 9125 from /etc/relay/relay.toml"; return 1; }
    log_has "$c" '"admin": "0.0.0.0:9125"' || { why="the relay did not read /etc/relay/relay.toml"; return 1; }
    eng rm -f -t 5 "$c" > /dev/null
}

one_line_error() {  # one_line_error OUTPUT-FILE RC WORDS...: exit 78, one line with WORDS
    local out=$1 rc=$2; shift 2
    [ "$rc" = 78 ] || { why="exit $rc, expected 78: $(head -c 400 "$out")"; return 1; }
    ! grep -q Traceback "$out" || { why="a traceback: $(head -c 400 "$out")"; return 1; }
    [ "$(grep -c . "$out")" = 1 ] || { why="not one line: $(cat "$out")"; return 1; }
    local w
    for w in "$@"; do
        grep -q -- "$w" "$out" || { why="the line does not say '$w': $(cat "$out")"; return 1; }
    done
}

t_root_owned_volume() {
    local c dir rc
    fresh; c=$NAME; dir=$work/root-owned
    mkdir -m 755 "$dir"
    containers+=("$c")
    timeout 120 "$ENGINE" run --name "$c" -v "$dir:/var/spool/relay" "$image" \
        > "$work/root-owned.out" 2>&1
    rc=$?
    grep -v 'systemd' "$work/root-owned.out" > "$work/root-owned.txt"
    one_line_error "$work/root-owned.txt" "$rc" /var/spool/relay "not writable" fsGroup chown
}

t_no_volume() {
    local c rc
    fresh; c=$NAME; containers+=("$c")
    timeout 120 "$ENGINE" run --name "$c" "$image" > "$work/no-volume.out" 2>&1
    rc=$?
    grep -v 'systemd' "$work/no-volume.out" > "$work/no-volume.txt"
    one_line_error "$work/no-volume.txt" "$rc" /var/spool/relay "not a volume" RELAY_ALLOW_EPHEMERAL_SPOOL
}

t_fsgroup_volume() {
    local c dir port
    fresh; c=$NAME; dir=$work/fsgroup; port=$(probe port)
    # what Kubernetes does with fsGroup: the volume's group, setgid, group-writable
    mkdir "$dir" && chown 0:4242 "$dir" && chmod 2775 "$dir"
    start "$c" -v "$dir:/var/spool/relay" --group-add 4242 -p "127.0.0.1:$port:8025" \
        -e RELAY_SES__ENDPOINT_URL=sandbox || { why="container did not start"; return 1; }
    probe http "http://127.0.0.1:$port/readyz" 60 200 > /dev/null \
        || { why="not ready on an fsGroup-style volume: $(logs "$c" | tail -3)"; return 1; }
    local mode
    mode=$(stat -c '%g %a' "$dir/active")
    [ "$mode" = "4242 2775" ] || { why="active/ is '$mode', expected group 4242 mode 2775"; return 1; }
    eng rm -f -t 5 "$c" > /dev/null
}

t_arbitrary_uid() {
    local c v port reply
    fresh; c=$NAME; new_volume || return 1; v=$VOL; port=$(probe port)
    start "$c" -v "$v:/var/spool/relay" --user 1234567:0 -p "127.0.0.1:$port:2525" \
        -e RELAY_SES__ENDPOINT_URL=sandbox -e "RELAY_SMTP__ALLOWED_NETWORKS=$NETWORK" \
        || { why="container did not start"; return 1; }
    wait_for 60 log_has "$c" '"listening"' || { why="relay never listened: $(logs "$c" | tail -3)"; return 1; }
    reply=$(probe smtp "$port")
    case $reply in 250*) ;; *) why="uid 1234567 gid 0: $reply"; return 1;; esac
    wait_for 30 has_mail "$c" || { why="nothing delivered under uid 1234567"; return 1; }
    eng rm -f -t 5 "$c" > /dev/null
}

t_read_only_root() {
    local c v port reply ro=(--read-only)
    fresh; c=$NAME; new_volume || return 1; v=$VOL; port=$(probe port)
    # podman mounts a tmpfs on /tmp with --read-only unless told not to; Docker does not
    [ "$ENGINE" = podman ] && ro+=(--read-only-tmpfs=false)
    start "$c" "${ro[@]}" -v "$v:/var/spool/relay" -p "127.0.0.1:$port:2525" \
        -e RELAY_SES__ENDPOINT_URL=sandbox -e "RELAY_SMTP__ALLOWED_NETWORKS=$NETWORK" \
        || { why="container did not start"; return 1; }
    wait_for 60 log_has "$c" '"listening"' || { why="relay never listened: $(logs "$c" | tail -3)"; return 1; }
    reply=$(probe smtp "$port")
    case $reply in 250*) ;; *) why="read-only root: $reply"; return 1;; esac
    wait_for 30 has_mail "$c" || { why="nothing delivered with a read-only root"; return 1; }
    eng exec "$c" grep -qz '^TMPDIR=/var/spool/relay/tmp$' /proc/1/environ \
        || { why="TMPDIR is not in the volume with an unwritable /tmp"; return 1; }
    eng rm -f -t 5 "$c" > /dev/null
}

t_stop_within_timeout() {
    local c v port reply t0 took rc mail
    fresh; c=$NAME; new_volume || return 1; v=$VOL; port=$(probe port)
    # each SendEmail call takes 6 s: stop arrives while one is in flight
    start "$c" -v "$v:/var/spool/relay" -p "127.0.0.1:$port:2525" \
        -e RELAY_SES__ENDPOINT_URL=sandbox -e RELAY_SANDBOX__LATENCY=6s \
        -e "RELAY_SMTP__ALLOWED_NETWORKS=$NETWORK" || { why="container did not start"; return 1; }
    wait_for 60 log_has "$c" '"listening"' || { why="relay never listened"; return 1; }
    reply=$(probe smtp "$port")
    case $reply in 250*) ;; *) why="$reply"; return 1;; esac
    sleep 2  # the pool takes a queued message in milliseconds; the call then lasts 6 s
    t0=$SECONDS
    timeout 60 "$ENGINE" stop -t 40 "$c" > /dev/null 2>&1
    took=$((SECONDS - t0)); rc=$(exit_code "$c")
    [ "$rc" = 0 ] || { why="exit code $rc after stop (SIGKILL is 137)"; return 1; }
    [ "$took" -lt 40 ] || { why="stop took $took s, documented 40"; return 1; }
    [ "$took" -ge 2 ] || { why="stop took $took s: no call was in flight to wait for"; return 1; }
    log_has "$c" '"stopped"' || { why="no 'stopped' line"; return 1; }
    ! log_has "$c" shutdown_abandoned || { why="an in-flight call was abandoned"; return 1; }
    log_has "$c" '"sent"' || { why="the in-flight call did not finish before the exit"; return 1; }
    mail=$(eng run --rm -v "$v:/s" --entrypoint sh "$image" -c 'ls /s/sandbox-mail | wc -l')
    [ "$mail" = 1 ] || { why="$mail messages in sandbox-mail, expected 1"; return 1; }
    say "  (stop took $took s with a 6 s SES call in flight)"
}

t_replacement_delivers() {
    local a b v port reply qid
    fresh; a=$NAME; fresh; b=$NAME; new_volume || return 1; v=$VOL; port=$(probe port)
    # the first container cannot reach SES (nothing listens on its endpoint): mail waits
    start "$a" -v "$v:/var/spool/relay" -p "127.0.0.1:$port:2525" \
        -e RELAY_SES__ENDPOINT_URL=http://127.0.0.1:9 -e AWS_ACCESS_KEY_ID=relay-check \
        -e AWS_SECRET_ACCESS_KEY=relay-check -e RELAY_DELIVERY__MIN_BACKOFF=1s \
        -e RELAY_DELIVERY__MAX_BACKOFF=2s -e "RELAY_SMTP__ALLOWED_NETWORKS=$NETWORK" \
        || { why="first container did not start"; return 1; }
    wait_for 60 log_has "$a" '"listening"' || { why="first relay never listened"; return 1; }
    reply=$(probe smtp "$port")
    case $reply in 250*) ;; *) why="first container: $reply"; return 1;; esac
    qid=${reply##* }
    wait_for 30 log_has "$a" '"deferred"' || { why="no delivery attempt in the first container"; return 1; }
    timeout 60 "$ENGINE" stop -t 40 "$a" > /dev/null 2>&1
    eng rm -f "$a" > /dev/null
    start "$b" -v "$v:/var/spool/relay" -e RELAY_SES__ENDPOINT_URL=sandbox \
        || { why="replacement did not start"; return 1; }
    wait_for 60 has_mail "$b" || { why="the replacement delivered nothing in 60 s"; return 1; }
    log_has "$b" "\"sent\", \"queue_id\": \"$qid\"" \
        || { why="the replacement's sent line is not for $qid: $(logs "$b" | grep '"sent"')"; return 1; }
    eng rm -f -t 5 "$b" > /dev/null
}

t_check_names_missing_credentials() {
    local rc
    timeout 120 "$ENGINE" run --rm -e AWS_EC2_METADATA_DISABLED=true \
        -e RELAY_SES__ENDPOINT_URL=http://127.0.0.1:9 "$image" check > "$work/check.out" 2>&1
    rc=$?
    [ "$rc" != 0 ] || { why="relay check exited 0 without credentials"; return 1; }
    ! grep -q Traceback "$work/check.out" || { why="a traceback"; return 1; }
    grep -qi credentials "$work/check.out" \
        || { why="does not mention credentials: $(grep -v systemd "$work/check.out")"; return 1; }
}

t_sendmail_link() {
    # /usr/sbin/sendmail is the relay's injector, as Postfix installs its own: cron's line
    # reaches option parsing (no relay listens here, and the spool is not a volume: exit 73
    # or 75 from queueing is fine; a usage error (64) or "unrecognized arguments" is not)
    local out rc
    out=$(printf 'Subject: cron\n\nhi\n' | timeout 60 "$ENGINE" run --rm -i \
        --entrypoint /usr/sbin/sendmail -e RELAY_SENDMAIL__LOCAL_DOMAIN=example.com "$image" \
        -FCronDaemon -i -B8BITMIME -oem root 2>&1); rc=$?
    [ "$rc" != 64 ] && [ "$rc" != 2 ] || { why="exit $rc: $out"; return 1; }
    ! echo "$out" | grep -q "unrecognized arguments" || { why="$out"; return 1; }
    ! echo "$out" | grep -q Traceback || { why="a traceback: $out"; return 1; }
}

t_manifests() {
    bash "$repo/deploy/kubernetes/validate.sh" > "$work/manifests.out" 2>&1 \
        || { why=$(tail -5 "$work/manifests.out"); return 1; }
}

# /readyz naming missing AWS credentials, and the refused line naming the variable to set.

t_readyz_names_missing_credentials() {
    local c v port body
    fresh; c=$NAME; new_volume || return 1; v=$VOL; port=$(probe port)
    start "$c" -v "$v:/var/spool/relay" -p "127.0.0.1:$port:8025" \
        -e RELAY_SES__ENDPOINT_URL=http://127.0.0.1:9 || { why="container did not start"; return 1; }
    body=$(probe http "http://127.0.0.1:$port/readyz" 60 503) \
        || { why="/readyz is not 503 without AWS credentials: $body"; return 1; }
    echo "$body" | grep -qi credentials || { why="/readyz does not name the credentials: $body"; return 1; }
    eng rm -f -t 5 "$c" > /dev/null
}

t_refused_line_names_the_variable() {
    echo "$REFUSED_LOG" | grep -q RELAY_SMTP__ALLOWED_NETWORKS \
        || { why="the refused line does not name RELAY_SMTP__ALLOWED_NETWORKS: $REFUSED_LOG"; return 1; }
}

# -- run ----------------------------------------------------------------------------------

setup_engine
setup_base
build
if [ "$ENGINE" = podman ]; then
    NETWORK=$(eng network inspect podman --format '{{range .Subnets}}{{.Subnet}} {{end}}' | awk '{print $1}')
else
    NETWORK=$(eng network inspect bridge --format '{{range .IPAM.Config}}{{.Subnet}} {{end}}' | awk '{print $1}')
fi
say "the engine's default network: $NETWORK (admitted where a check sends through a published port)"

check "the image runs as the numeric user 10001:10001" t_user
check "a code change rebuilds the relay's layer and keeps the dependency layer" t_code_change_keeps_dependency_layer
check "the image has OCI labels and a health check with a start period" t_labels_and_healthcheck
check "a client through a published port gets 554 by default and the log names smtp.allowed_networks" t_published_port_refused
check "a message through a published port reaches the sandbox once the network is admitted" t_published_port_delivers
check "the health check passes on admin port 9025 set by RELAY_ADMIN__PORT, and only there" t_healthcheck_env_port
check "the config at /etc/relay/relay.toml is read and the health check follows its admin.port" t_healthcheck_config_port
check "a root-owned spool volume stops the relay with one line naming the directory and the fix" t_root_owned_volume
check "serve without a spool volume stops with one line naming the directory" t_no_volume
check "an fsGroup-style volume (group 4242, setgid) is used, new directories group-writable" t_fsgroup_volume
check "an arbitrary uid in group 0 takes and delivers mail on a fresh volume" t_arbitrary_uid
check "a read-only root with no /tmp mount takes and delivers mail" t_read_only_root
check "stop during an SES call ends with exit 0 within the documented 40 s, the call finished" t_stop_within_timeout
check "mail queued in one container is delivered by its replacement on the same volume" t_replacement_delivers
check "relay check names the missing AWS credentials and exits non-zero" t_check_names_missing_credentials
check "/usr/sbin/sendmail is the relay's injector and takes cron's options" t_sendmail_link
check "the Kubernetes manifests pass the schemas and the relay pod policy" t_manifests

check "/readyz is 503 and names the missing AWS credentials" t_readyz_names_missing_credentials
check "the 554 log line names RELAY_SMTP__ALLOWED_NETWORKS" t_refused_line_names_the_variable

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
