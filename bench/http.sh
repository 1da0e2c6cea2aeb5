#!/usr/bin/env bash
# http.sh: net/http over sockfsm's Listener (the net.Conn face) against
# net/http over a plain net.Listener, as processes (bench/httpserver), over
# loopback TCP, loaded by wrk (Debian's package, installed here if missing).
#
# Each server runs pinned to CPU $SERVER_CPU and wrk to CPU $LOADGEN_CPU. For
# every round, every mode and then every server (sockfsm, plain, sockfsm,
# plain, ...), a fresh server is started and loaded once:
#
#   keepalive  $CONNS keep-alive connections, small responses
#   close      $CONNS connections, a new one per request (Connection: close)
#
# Each reports the server's CPU time per request (utime+stime from
# /proc/PID/stat before and after the load, divided by wrk's request count)
# and wrk's p99 latency. The medians over the rounds and the ratios
# sockfsm/plain are printed as a table on stderr, then as one line on
# stdout:
#
#   http rounds=5 keepalive_cpu_us_sockfsm=.. keepalive_cpu_us_plain=.. keepalive_cpu_us_ratio=.. ... failures=0
#
# Settings (environment): ROUNDS (5), DURATION (6s), CONNS (32), THREADS
# (1), MODES ("keepalive close"), SERVER_CPU (0), LOADGEN_CPU (1), OUT (a new
# directory under /tmp). Target (the issue): every ratio at most 1.10.
# Linux only (/proc); loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6s}
CONNS=${CONNS:-32}
THREADS=${THREADS:-1}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
OUT=${OUT:-$(mktemp -d /tmp/sockfsm-http.XXXXXX)}
SERVERS=(sockfsm plain)
read -ra MODES <<<"${MODES:-keepalive close}"

say() { printf '%s\n' "$*" >&2; }
# shellcheck source=bench/lib.sh
source bench/lib.sh
trap kill_server EXIT
die() { say "http.sh: $*"; exit 1; }

[[ $ROUNDS =~ ^[0-9]+$ ]] && ((ROUNDS >= 1 && ROUNDS <= 50)) || die "ROUNDS=$ROUNDS: want 1 to 50"
for mode in "${MODES[@]}"; do
	case $mode in keepalive | close) ;; *) die "MODES: unknown mode $mode: want some of keepalive close" ;; esac
done
if ! command -v wrk >/dev/null; then
	say "== installing wrk (Debian's package)"
	if [[ $(id -u) == 0 ]]; then
		(apt-get update -qq && apt-get install -y -qq wrk) >&2
	else
		sudo apt-get update -qq && sudo apt-get install -y -qq wrk >&2
	fi
fi
for tool in taskset awk getconf go wrk; do
	command -v "$tool" >/dev/null || die "$tool not found"
done
CLK_TCK=$(getconf CLK_TCK)
mkdir -p "$OUT/bin"
: >"$OUT/runs.txt"

say "== building into $OUT/bin"
go build -o "$OUT/bin/httpserver" ./bench/httpserver

start_server() { launch "$1" "$2" "$OUT/bin/httpserver" -listener "$1" -addr 127.0.0.1:0; }

# to_us VALUE: wrk's latency (e.g. 1.23ms, 456.00us, 1.02s) in microseconds.
to_us() {
	awk -v v="$1" 'BEGIN {
		if (v ~ /us$/) { sub(/us$/, "", v); print v + 0 }
		else if (v ~ /ms$/) { sub(/ms$/, "", v); print v * 1000 }
		else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000000 }
		else print v + 0 }'
}

failures=0

run_one() {
	local mode=$1 name=$2 round=$3 t0 t1 out reqs p99 errs
	local log="$OUT/$name.$mode.$round.log"
	start_server "$name" "$log"
	local args=(-t "$THREADS" -c "$CONNS" -d "$DURATION" --latency)
	[[ $mode == close ]] && args+=(-H "Connection: close")
	t0=$(cpu_ticks "$SRV_PID")
	out=$(taskset -c "$LOADGEN_CPU" wrk "${args[@]}" "http://$SRV_ADDR/" 2>&1) || failures=$((failures + 1))
	t1=$(cpu_ticks "$SRV_PID")
	stop_server
	printf '%s\n' "$out" >"$OUT/$name.$mode.$round.wrk"
	reqs=$(printf '%s\n' "$out" | awk '/requests in/ { print $1; exit }')
	p99=$(printf '%s\n' "$out" | awk '$1 == "99%" { print $2; exit }')
	errs=$(printf '%s\n' "$out" | awk '/Socket errors|Non-2xx/ { n++ } END { print n + 0 }')
	[[ -n $reqs && -n $p99 ]] || die "wrk printed no result for $name $mode: $out"
	if ((errs != 0)); then
		failures=$((failures + 1))
		say "warning: $name $mode round $round: $(printf '%s\n' "$out" | grep -E 'Socket errors|Non-2xx')"
	fi
	local cpu_us
	cpu_us=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.3f", t / hz * 1e6 / n }')
	printf 'round=%s server=%s mode=%s requests=%s ticks=%s cpu_us=%s p99_us=%s\n' "$round" "$name" "$mode" "$reqs" "$((t1 - t0))" "$cpu_us" "$(to_us "$p99")" >>"$OUT/runs.txt"
	printf '%s\n' "$cpu_us" >>"$OUT/$name.$mode.cpu"
	to_us "$p99" >>"$OUT/$name.$mode.p99"
}

for round in $(seq "$ROUNDS"); do
	for mode in "${MODES[@]}"; do
		for name in "${SERVERS[@]}"; do
			say "== round $round/$ROUNDS: $mode $name"
			run_one "$mode" "$name" "$round"
		done
	done
done

line="http rounds=$ROUNDS"
say ""
say "$(printf '%-22s %12s %12s %8s %s' metric sockfsm plain ratio 'target ≤1.10')"
for mode in "${MODES[@]}"; do
	for metric in cpu p99; do
		s=$(median "$OUT/sockfsm.$mode.$metric")
		p=$(median "$OUT/plain.$mode.$metric")
		r=$(awk -v s="$s" -v p="$p" 'BEGIN { printf "%.3f", s / p }')
		ok=$(awk -v r="$r" 'BEGIN { print (r <= 1.10) ? "met" : "MISSED" }')
		name="${mode}_${metric}_us"
		say "$(printf '%-22s %12s %12s %8s %s' "$name" "$s" "$p" "$r" "$ok")"
		line+=" ${name}_sockfsm=$s ${name}_plain=$p ${name}_ratio=$r"
	done
done
say "runs: $OUT/runs.txt"
printf '%s failures=%s\n' "$line" "$failures"
