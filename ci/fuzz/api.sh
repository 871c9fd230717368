#!/usr/bin/env bash
# By-hand fuzzing of vmsh's HTTP API with schemathesis (issue #16), against vmsh's own
# vmsh/api/openapi.json and, when given, cloud-hypervisor's v40 OpenAPI document.
#
# Usage: ci/fuzz/api.sh [--examples N] [--seed N] [--ch-spec PATH] [--modes "empty tiny"]
#                       [--venv DIR] [--no-sandbox]
#
#   --examples N   test cases per API operation and phase (default 25): bounds the run
#   --seed N       schemathesis seed (default 0)
#   --ch-spec PATH cloud-hypervisor's vmm/src/api/openapi/cloud-hypervisor.yaml at tag v40.0;
#                  nothing is downloaded: get it with
#                    git clone https://github.com/cloud-hypervisor/cloud-hypervisor
#                    git -C cloud-hypervisor show v40.0:vmm/src/api/openapi/cloud-hypervisor.yaml > ch-v40.yaml
#                  without it only vmsh's document is used
#   --modes LIST   "empty": a VMM with no VM; "tiny": a VMM running a tiny PVH guest (a spinning
#                  loop from tests/engine/tiny_kernel.py) with a disk, so the running-VM
#                  endpoints (info, counters, pause, hotplug ...) answer too (default: both)
#   --venv DIR     where schemathesis is installed (default ~/.cache/vmsh/schemathesis-venv;
#                  created with `python3 -m venv` and `pip install schemathesis` if it has none;
#                  schemathesis is not one of vmsh's test requirements)
#   --no-sandbox   run the VMM as this user in the host's namespaces (see below)
#
# Each (document, mode) pair gets a fresh VMM (`python3 -m vmsh launch --api-socket path=...`)
# and one `schemathesis run` (phases examples, coverage, fuzzing, stateful; no shrinking),
# reached through a TCP -> unix-socket forwarder bound to 127.0.0.1 only. vmm.shutdown is left
# out of the runs (it ends the VMM) and checked once at the end of each. After each run the
# script checks the VMM still answers vmm.ping and is still running, and counts requests and
# responses by status from the forwarder's log.
#
# The fuzzer names host paths (disk images, serial files, snapshot destinations, vsock
# sockets) and a VMM as root acts on them; so by default everything runs in new mount and
# network namespaces (unshare) where every file system is read-only except a tmpfs working
# directory, and taps land in an empty network namespace. Output: schemathesis's report and a
# summary on stdout; the exit status is 0 when every run found nothing and the VMM survived.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
EXAMPLES=25
SEED=0
CH_SPEC=""
MODES="empty tiny"
VENV="${HOME}/.cache/vmsh/schemathesis-venv"
SANDBOX=1

while [ $# -gt 0 ]; do
    case "$1" in
        --examples) EXAMPLES="$2"; shift 2 ;;
        --seed) SEED="$2"; shift 2 ;;
        --ch-spec) CH_SPEC="$(realpath "$2")"; shift 2 ;;
        --modes) MODES="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --no-sandbox) SANDBOX=0; shift ;;
        -h|--help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "api.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -n "$CH_SPEC" ] && [ ! -f "$CH_SPEC" ]; then
    echo "api.sh: $CH_SPEC is not a file" >&2
    exit 2
fi

if [ -z "${_VMSH_API_FUZZ_INNER:-}" ]; then
    # outside the sandbox: get schemathesis, then run the rest in new namespaces
    if [ ! -x "$VENV/bin/schemathesis" ]; then
        echo "api.sh: installing schemathesis into $VENV (python3 -m venv; pip install schemathesis)"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet schemathesis
    fi
    echo "api.sh: $("$VENV/bin/schemathesis" --version), vmsh $(git -C "$ROOT" rev-parse --short HEAD)," \
         "$(date -u +%Y-%m-%dT%H:%MZ)"
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/vmsh-api-fuzz.XXXXXX")"
    trap 'rmdir "$WORK" 2>/dev/null || true' EXIT
    export _VMSH_API_FUZZ_INNER=1 _VMSH_API_FUZZ_WORK="$WORK"
    args=(--examples "$EXAMPLES" --seed "$SEED" --modes "$MODES" --venv "$VENV")
    [ -n "$CH_SPEC" ] && args+=(--ch-spec "$CH_SPEC")
    if [ "$SANDBOX" = 0 ]; then
        st=0
        "$0" "${args[@]}" --no-sandbox || st=$?
        rm -rf "$WORK"
        exit $st
    fi
    userns=()
    [ "$(id -u)" = 0 ] || userns=(--user --map-root-user)
    if ! unshare "${userns[@]}" --mount --net --propagation private true 2>/dev/null; then
        echo "api.sh: cannot create mount and network namespaces (unshare);" \
             "run it in a throwaway VM or container with --no-sandbox" >&2
        exit 2
    fi
    st=0
    unshare "${userns[@]}" --mount --net --propagation private -- "$0" "${args[@]}" || st=$?
    exit $st
fi

# --- inside the sandbox (or with --no-sandbox) ---------------------------------------------
WORK="$_VMSH_API_FUZZ_WORK"
if [ "$SANDBOX" = 1 ]; then
    ip link set lo up
    # every file system read-only but the kernel's own; a tmpfs to work in
    findmnt -rno TARGET | while read -r mp; do
        case "$mp" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
        mount -o remount,bind,ro "$mp" 2>/dev/null || mount --bind -o ro "$mp" "$mp" 2>/dev/null || true
    done
    mount -t tmpfs -o size=256m,mode=0700 vmsh-api-fuzz "$WORK"
fi
cd "$WORK"
export PYTHONPATH="$ROOT" PYTHONDONTWRITEBYTECODE=1 HOME="$WORK"

FORWARDER='
import socket, sys, threading
listen, target, log = sys.argv[1], sys.argv[2], open(sys.argv[3], "a", buffering=1)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 0))
server.listen(128)
open(listen, "w").write(str(server.getsockname()[1]))

def pump(src, dst, tag):
    try:
        while data := src.recv(65536):
            if tag == ">" and data[:4] in (b"GET ", b"PUT ", b"POST", b"HEAD", b"DELE", b"PATC", b"OPTI"):
                log.write("> " + data.split(b"\r\n", 1)[0].decode("latin-1") + "\n")
            elif tag == "<":
                for reply in data.split(b"HTTP/1.1 ")[1:]:
                    status = reply.split(b"\r\n", 1)[0].decode("latin-1")
                    log.write("< HTTP/1.1 " + status + "\n")
                    if status.startswith("5"):  # what the server said, for triage
                        body = reply.partition(b"\r\n\r\n")[2][:300].decode("latin-1")
                        log.write("5 " + status[:3] + " " + body.replace("\n", " ") + "\n")
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

def serve(client):
    upstream = socket.socket(socket.AF_UNIX)
    try:
        upstream.connect(target)
    except OSError as err:
        log.write("! connect: %s\n" % err)
        client.close()
        return
    threading.Thread(target=pump, args=(upstream, client, "<"), daemon=True).start()
    pump(client, upstream, ">")

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'

ping() {  # ping SOCKET: vmm.ping over the unix socket, 5 s at most
    python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
reply = s.recv(65536)
sys.exit(0 if reply.startswith(b"HTTP/1.1 200") else 1)
EOF
}

shutdown_vmm() {  # shutdown_vmm SOCKET PID: vmm.shutdown answered and the VMM gone within 10 s
    python3 - "$1" <<'EOF' || return 1
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b"PUT /api/v1/vmm.shutdown HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
reply = s.recv(65536)
sys.exit(0 if reply.split(b" ")[1][:1] == b"2" else 1)
EOF
    for _ in $(seq 100); do
        kill -0 "$2" 2>/dev/null || { wait "$2"; return $?; }
        sleep 0.1
    done
    return 1
}

python3 - "$WORK/tiny.elf" <<'EOF'
import sys
from tests.engine.tiny_kernel import SPIN, kernel
open(sys.argv[1], "wb").write(kernel(SPIN))
EOF
truncate -s 8M "$WORK/disk.img"

specs=("vmsh=$ROOT/vmsh/api/openapi.json")
if [ -n "$CH_SPEC" ]; then
    specs+=("cloud-hypervisor-v40=$CH_SPEC")
else
    echo "api.sh: no --ch-spec: cloud-hypervisor's document left out (see --help for where to get it)"
fi

status=0
summary=()
for spec in "${specs[@]}"; do
    name="${spec%%=*}"
    path="${spec#*=}"
    for mode in $MODES; do
        run="$name-$mode"
        sock="$WORK/$run.sock"
        vmm_args=(launch --api-socket "path=$sock")
        if [ "$mode" = tiny ]; then
            vmm_args+=(--kernel "$WORK/tiny.elf" --memory size=64M --serial off --console off
                       --disk "path=$WORK/disk.img")
        fi
        python3 -m vmsh "${vmm_args[@]}" >"$WORK/$run.vmm.log" 2>&1 &
        vmm=$!
        for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
        python3 -c "$FORWARDER" "$WORK/$run.port" "$sock" "$WORK/$run.forward.log" &
        forwarder=$!
        for _ in $(seq 100); do [ -s "$WORK/$run.port" ] && break; sleep 0.1; done
        port="$(cat "$WORK/$run.port")"
        echo
        echo "=== $run: $path against 127.0.0.1:$port -> $sock (VMM pid $vmm)"
        # vmsh's document is its own: every status code and schema must hold. Cloud-hypervisor's
        # v40 document is neither complete nor what cloud-hypervisor does (its 400/404 answers
        # are undocumented, bodies it refuses are schema-valid, the NMI route is spelled
        # /vmm.nmi): against it only server errors, content types, response bodies and
        # schema-invalid bodies accepted count.
        checks=not_a_server_error,content_type_conformance,response_schema_conformance,negative_data_rejection
        [ "$name" = vmsh ] && checks="$checks,status_code_conformance"
        # the tiny guest should stay up for the other operations: shut down and deleted only
        # in the empty mode
        excluded=(--exclude-path /vmm.shutdown)
        [ "$mode" = tiny ] && excluded+=(--exclude-path /vm.shutdown --exclude-path /vm.delete)
        st=0
        "$VENV/bin/schemathesis" run "$path" --url "http://127.0.0.1:$port/api/v1" \
            --max-examples "$EXAMPLES" --seed "$SEED" --no-shrink --generation-database none \
            --phases examples,coverage,fuzzing,stateful --workers 1 --continue-on-failure \
            --request-timeout 20 --max-response-time 10 --checks "$checks" \
            "${excluded[@]}" --suppress-health-check all --no-color || st=$?
        alive=yes
        if ! kill -0 "$vmm" 2>/dev/null; then
            rc=0
            wait "$vmm" || rc=$?
            alive="no (exited with $rc)"
        elif ! ping "$sock"; then
            alive="no (vmm.ping unanswered)"
        fi
        down=no
        if [ "${alive%% *}" = yes ] && shutdown_vmm "$sock" "$vmm"; then down=yes; fi
        kill "$forwarder" 2>/dev/null || true
        kill "$vmm" 2>/dev/null || true
        wait "$forwarder" "$vmm" 2>/dev/null || true
        requests=$(grep -c '^> ' "$WORK/$run.forward.log" || true)
        codes=$(grep '^< ' "$WORK/$run.forward.log" | awk '{print $3}' | sort | uniq -c | awk '{printf "%s:%s ", $2, $1}')
        line="$run: schemathesis exit $st, $requests requests, responses ${codes:-none}, VMM alive $alive, vmm.shutdown clean $down"
        summary+=("$line")
        echo "$line"
        if grep -q '^5 ' "$WORK/$run.forward.log"; then
            echo "--- $run: server errors by body:"
            grep '^5 ' "$WORK/$run.forward.log" | cut -c3- | sort | uniq -c | sort -rn | head -40
        fi
        if grep -q Traceback "$WORK/$run.vmm.log"; then
            echo "--- $run: tracebacks in the VMM's log:"
            grep -B2 -A20 Traceback "$WORK/$run.vmm.log" | head -80
        fi
        [ "$st" = 0 ] && [ "${alive%% *}" = yes ] && [ "$down" = yes ] || status=1
    done
done

echo
echo "=== summary (examples $EXAMPLES per operation and phase, seed $SEED)"
printf '%s\n' "${summary[@]}"
exit $status
