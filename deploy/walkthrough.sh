#!/usr/bin/env bash
# Walk deploy/README.md on this machine, as an operator would, in a scratch
# folder and on loopback ports only: build a wheel, install it into a fresh
# virtual environment, configure a node from relayx.example.toml, check it,
# start it, take a message while the primary is down, then a tenant cutover
# (hold, re-route to a new primary, release at a rate) and its audit trail.
# Exits 0 when every step did what the guide says. tests/test_deploy_guide.py
# runs it; by hand: bash deploy/walkthrough.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/relayx-walkthrough-XXXXXX")
node_pid=""
sink_pid=""
cleanup() {
    [ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null && wait "$node_pid" 2>/dev/null || true
    [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 300); do
        "$python" -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

step "1. Install: a wheel built from the checkout, into its own virtual environment"
"$python" -m pip wheel --quiet --no-deps -w "$scratch/dist" "$repo"
"$python" -m venv "$scratch/opt"
"$scratch/opt/bin/pip" install --quiet "$scratch"/dist/relayx-*.whl
relayx="$scratch/opt/bin/relayx"

step "2. Configure one node from relayx.example.toml (loopback ports, its own data directory)"
smtp=$(free_port); admin=$(free_port); old_primary=$(free_port); new_primary=$(free_port)
mkdir -m 700 "$scratch/var"
sed -e "s|tcp:2525:interface=127.0.0.1|tcp:$smtp:interface=127.0.0.1|" \
    -e "s|tcp:8025:interface=127.0.0.1|tcp:$admin:interface=127.0.0.1|" \
    -e "s|smtp://127.0.0.1:2526|smtp://127.0.0.1:$old_primary|" \
    -e "s|^data_dir = .*|data_dir = \"$scratch/var\"|" \
    -e "s|^processes = .*|processes = 1|" \
    "$repo/deploy/relayx.example.toml" > "$scratch/relayx.toml"
config=(--config "$scratch/relayx.toml")

step "3. relayx check"
"$relayx" check "${config[@]}"

step "4. Start the node (systemd would run the same command)"
"$relayx" "${config[@]}" > "$scratch/node.log" 2>&1 &
node_pid=$!
wait_port "$smtp"

step "5. Mail for example.com while its primary is down: 250, queued"
"$python" - "$smtp" <<'PY'
import smtplib, sys
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30) as s:
    s.sendmail("bob@sender.test", ["alice@example.com"], "Subject: held for the cutover\r\n\r\nhello\r\n")
PY
"$relayx" status example.com "${config[@]}" --json | "$python" -c '
import json, sys
status = json.load(sys.stdin)
assert status["total"] == 1, status
print("queued:", status["jobs"])'

step "6. Cutover: hold, re-route to the new tenant, start it, release at 20 msg/s"
"$relayx" hold example.com "${config[@]}"
"$relayx" route example.com "smtp://127.0.0.1:$new_primary" "${config[@]}"
"$python" - "$new_primary" "$scratch/delivered" <<'PY' &
import socket, sys
port, out = int(sys.argv[1]), sys.argv[2]
server = socket.create_server(("127.0.0.1", port))
def session(conn):
    f = conn.makefile("rwb")
    f.write(b"220 new-tenant ESMTP\r\n"); f.flush()
    data, body = False, []
    for line in f:
        if data:
            if line == b".\r\n":
                open(out, "ab").write(b"".join(body)); data = False
                f.write(b"250 2.0.0 Ok: queued as NEW1\r\n"); f.flush()
            else:
                body.append(line)
            continue
        verb = line[:4].upper()
        if verb == b"DATA":
            data = True; f.write(b"354 go\r\n")
        elif verb == b"QUIT":
            f.write(b"221 bye\r\n"); f.flush(); break
        elif verb == b"EHLO":
            f.write(b"250-new-tenant\r\n250 8BITMIME\r\n")
        else:
            f.write(b"250 ok\r\n")
        f.flush()


while True:
    conn, _ = server.accept()
    try:  # a port probe that connects and goes at once is no reason to stop
        session(conn)
    except OSError:
        pass
    conn.close()
PY
sink_pid=$!
wait_port "$new_primary"
"$relayx" release example.com --rate 20 "${config[@]}"
for _ in $(seq 1 300); do
    [ -s "$scratch/delivered" ] && break
    sleep 0.1
done
grep -q "Subject: held for the cutover" "$scratch/delivered"
echo "delivered to the new tenant"

step "7. The audit trail: hold, route, release, each with who and what was before"
"$relayx" audit "${config[@]}" | tee "$scratch/audit"
for action in hold route release; do grep -q "$action" "$scratch/audit"; done

step "8. Stop the node: SIGTERM, as systemctl stop sends"
kill -TERM "$node_pid"
status=0
wait "$node_pid" || status=$?
node_pid=""
# twistd ends by re-raising the signal it was stopped with
[ "$status" = 0 ] || [ "$status" = 143 ]
echo "walkthrough done"
