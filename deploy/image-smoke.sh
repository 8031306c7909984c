#!/usr/bin/env bash
# Build the Dockerfile with buildah and run the image with podman, as a user would, with
# no Docker engine and no image registry:
#
#   1. a Debian base image made with debootstrap (cached as a tarball between runs),
#      passed to the Dockerfile as PYTHON_IMAGE;
#   2. buildah bud (chroot isolation) of the Dockerfile, unchanged otherwise;
#   3. podman run (runc, host network) as an arbitrary non-root uid with --cpus 1
#      --memory 512m: the app answers, /readyz is 200, the plan reads 1 worker from the
#      cgroup, SIGTERM ends it with exit code 0 within the drain time;
#   4. the same with a read-only root filesystem and a tmpfs as TMPDIR;
#   5. a read-only root filesystem with nothing writable: exit 2, and the message names
#      the setting to change.
#
# Needs root and: apt-get install buildah podman runc debootstrap (.ci/run installs them).
# Everything lives in a scratch directory (storage, run root) that is removed at the end;
# nothing is left in /var/lib/containers. Prints TIMING lines for each step.
# usage: deploy/image-smoke.sh [CONTEXT]    (default: the repository)
set -euo pipefail
CONTEXT=$(cd "${1:-$(dirname "$0")/..}" && pwd)
SUITE=${SUITE:-bookworm}  # Python 3.11, the oldest the project supports
CACHE=${IMAGE_SMOKE_CACHE:-/var/cache/asgi-supervise-ci}
INCLUDE=python3,python3-venv,python3-dev,ca-certificates
BASE_TAR=$CACHE/base-$SUITE-$(echo "$INCLUDE" | md5sum | cut -c1-8).tar  # new list, new base
BASE=localhost/asgi-supervise-ci-base:$SUITE
IMAGE=localhost/asgi-supervise:smoke
WORK=$(mktemp -d -t image-smoke.XXXXXX)
S=(--storage-driver overlay --root "$WORK/store" --runroot "$WORK/run")
P=(--tmpdir "$WORK/libpod" --events-backend file)  # podman's own state, also in $WORK
# buildah and podman keep a blob cache in /var/lib/containers whatever --root says: if
# it is not there now, it goes again at the end.
[ -e /var/lib/containers ] && KEEP_VAR_LIB=1 || KEEP_VAR_LIB=
exec 3>&2  # TIMING lines, whatever a step's own output is redirected to
# crun refuses this VM's hybrid cgroup v1/v2 layout; runc works. podman's default rlimits
# need CAP_SYS_RESOURCE, which this machine does not give. Host network: nothing changes
# on the host (no bridge, no NAT rules); the server binds 127.0.0.1.
RUN=(--runtime runc --network host --ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
UID_ARBITRARY=54321  # not the image's 10001, and in no passwd file
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
    || echo http://deb.debian.org/debian)

timed() {
    local start=$SECONDS
    "$@"
    echo "TIMING $((SECONDS - start))s: $*" | cut -c1-140 >&3
}
cleanup() {
    local code=$?
    podman "${S[@]}" "${P[@]}" rm -af -t 0 >/dev/null 2>&1 || true
    buildah "${S[@]}" rm --all >/dev/null 2>&1 || true
    podman "${S[@]}" "${P[@]}" rmi -af >/dev/null 2>&1 || true
    umount -R "$WORK/store/overlay" 2>/dev/null || true
    umount -R "$WORK/store" "$WORK/run" 2>/dev/null || true
    rm -rf "$WORK"
    [ -n "$KEEP_VAR_LIB" ] || rm -rf /var/lib/containers
    exit $code
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {  # URL EXPECTED_STATUS SECONDS
    local deadline=$((SECONDS + $3)) code
    while ((SECONDS < deadline)); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true)
        [ "$code" = "$2" ] && return 0
        sleep 0.2
    done
    return 1
}
# Wait for a container to exit; its exit code on stdout. Fails after SECONDS.
wait_exit() {  # NAME SECONDS
    local deadline=$((SECONDS + $2)) state
    while ((SECONDS < deadline)); do
        state=$(podman "${S[@]}" "${P[@]}" inspect "$1" --format '{{.State.Status}}')
        if [ "$state" = exited ]; then
            podman "${S[@]}" "${P[@]}" inspect "$1" --format '{{.State.ExitCode}}'
            return 0
        fi
        sleep 0.1
    done
    return 1
}

for tool in buildah podman runc debootstrap curl; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (apt-get install buildah podman runc debootstrap curl)"
done

# 1. The base image: Debian's Python, the host's CA bundle (pip in RUN steps goes through
#    the same TLS-inspecting egress as the host), pip usable as in the official image.
make_base() {
    local root=$WORK/rootfs
    debootstrap --variant=minbase --include="$INCLUDE" \
        "$SUITE" "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf python3 "$root/usr/bin/python"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    mkdir -p "$CACHE"
    tar -C "$root" -cf "$BASE_TAR.part" . && mv "$BASE_TAR.part" "$BASE_TAR"
    rm -rf "$root"
}
[ -s "$BASE_TAR" ] || timed make_base
timed podman "${S[@]}" "${P[@]}" import -q "$BASE_TAR" "$BASE" >/dev/null

# 2. The Dockerfile as it is, FROM the local base.
timed buildah "${S[@]}" bud -q --isolation chroot --pull=never --format docker \
    --build-arg "PYTHON_IMAGE=$BASE" -t "$IMAGE" "$CONTEXT" >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; fail "buildah bud"; }
echo "image: $(podman "${S[@]}" "${P[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE")"

# 3. and 4. Run as an arbitrary uid, 1 CPU and 512 MiB; then also read-only.
check_run() {  # NAME EXTRA_PODMAN_ARGS...
    local name=$1 port metrics started code plan
    shift
    port=$(free_port)
    metrics=$(free_port)
    podman "${S[@]}" "${P[@]}" run -d "${RUN[@]}" --name "$name" --user "$UID_ARBITRARY:0" \
        --cpus 1 --memory 512m "$@" "$IMAGE" \
        run examples.hello:app --profile container --host 127.0.0.1 --port "$port" \
        --metrics-host 127.0.0.1 --metrics-port "$metrics" >/dev/null
    wait_http "http://127.0.0.1:$metrics/readyz" 200 60 \
        || { podman "${S[@]}" "${P[@]}" logs "$name"; fail "$name: /readyz never 200"; }
    curl -sf "http://127.0.0.1:$port/" | grep -q "Hello from worker" \
        || { podman "${S[@]}" "${P[@]}" logs "$name"; fail "$name: the app does not answer"; }
    echo "$name: app answers, /readyz 200, as uid $(podman "${S[@]}" "${P[@]}" exec "$name" id -u)"
    plan=$(podman "${S[@]}" "${P[@]}" exec "$name" asgi-supervise plan --json --profile container)
    echo "$name: plan $(echo "$plan" | python3 -c 'import json,sys; p=json.load(sys.stdin); c=[b for b in p["budgets"] if b["name"]=="cpu"][0]; print(json.dumps({"workers": p["workers"], "limited_by": p["limited_by"], "cpu": c["detail"]}))')"
    echo "$plan" | python3 -c 'import json,sys; p=json.load(sys.stdin); sys.exit(p["workers"] != 1)' \
        || fail "$name: the plan does not read 1 worker from --cpus 1"
    # SIGTERM, as the kubelet sends it: drain delay 5 s + graceful timeout 20 s at most.
    started=$SECONDS
    podman "${S[@]}" "${P[@]}" kill --signal TERM "$name" >/dev/null
    code=$(wait_exit "$name" 30) || fail "$name: still running 30 s after SIGTERM"
    echo "$name: SIGTERM -> exit code $code after $((SECONDS - started)) s (drain delay 5 s + graceful timeout 20 s)"
    [ "$code" = 0 ] || { podman "${S[@]}" "${P[@]}" logs "$name" | tail -20; fail "$name: exit code $code"; }
}
timed check_run writable
# The chart's layout: read-only root, a writable volume that TMPDIR points to.
timed check_run readonly --read-only --read-only-tmpfs=false --tmpfs /scratch:size=64m \
    -e TMPDIR=/scratch

# 5. Read-only with nothing writable: a clear error, exit 2, not a traceback.
podman "${S[@]}" "${P[@]}" run "${RUN[@]}" --name nowhere --user "$UID_ARBITRARY:0" \
    --read-only --read-only-tmpfs=false "$IMAGE" \
    run examples.hello:app --profile container --host 127.0.0.1 --port "$(free_port)" \
    --metrics-host 127.0.0.1 --metrics-port "$(free_port)" >"$WORK/nowhere.log" 2>&1 \
    && fail "nowhere: started with nothing writable"
code=$(podman "${S[@]}" "${P[@]}" inspect nowhere --format '{{.State.ExitCode}}')
echo "nowhere: exit code $code: $(grep -m1 -i 'writable' "$WORK/nowhere.log" || true)"
[ "$code" = 2 ] || { cat "$WORK/nowhere.log"; fail "nowhere: exit code $code, not 2"; }
grep -q -- "--multiproc-dir" "$WORK/nowhere.log" || { cat "$WORK/nowhere.log"; fail "nowhere: the message names no setting"; }
echo "image smoke test passed"
