#!/usr/bin/env bash
# compare.sh: sockfsm's echo server (cmd/server) against the plain
# goroutine-per-connection baseline (bench/plainecho), as processes, over
# loopback TCP, loaded by cmd/loadgen.
#
# Each server runs pinned to CPU $SERVER_CPU and loadgen to CPU $LOADGEN_CPU
# (taskset), so the server's Go runtime sees one CPU. For every round, every
# mode and then every server (sockfsm, plain, sockfsm, plain, ...), a fresh
# server is started and loaded once:
#
#   echo   $ECHO_CONNS persistent connections, $ECHO_SIZE-byte round trips
#   churn  $CHURN_CONNS workers: connect, 14 bytes, half-close, read to EOF, close
#   idle   $IDLE_CONNS idle connections held for $IDLE_DURATION
#
# echo and churn report the server's CPU time per op (utime+stime from
# /proc/PID/stat before and after the load, in clock ticks of
# `getconf CLK_TCK`, divided by the ops) and loadgen's p99 latency; idle
# reports the server's RSS growth per connection (loadgen -pid). The medians
# over the rounds and the ratios sockfsm/plain are printed as a table on
# stderr, then as one line on stdout:
#
#   compare rounds=5 echo_cpu_us_sockfsm=.. echo_cpu_us_plain=.. echo_cpu_us_ratio=.. ... failures=0
#
# with, for each metric (echo_cpu_us, echo_p99_us, churn_cpu_us,
# churn_p99_us, idle_kib), METRIC_sockfsm, METRIC_plain, METRIC_ratio
# (sockfsm/plain, of the medians) and METRIC_paired (the median of each
# round's own sockfsm/plain ratio), and failures: the runs with failed ops or
# a non-zero exit. The table says whether each ratio of medians meets the
# issue's target (≤1.05 for CPU, ≤1.1 for p99, ≤1.25 for idle memory),
# comparing the unrounded ratio. The paired ratio is shown beside it: this
# machine switches between a fast and a slow state (about 25% apart) from
# one load to the next, and a round's two loads usually share one, while
# the medians of two servers may not (docs/performance.md).
#
# Settings (environment): ROUNDS (5), DURATION (6s, echo and churn),
# MODES ("echo churn idle": which loads to run, and report),
# ECHO_CONNS (32), ECHO_SIZE (64), CHURN_CONNS (16), IDLE_CONNS (1000),
# IDLE_DURATION (3s), SERVER_CPU (0), LOADGEN_CPU (1), OUT (a new directory
# under /tmp: binaries, server logs, every loadgen line in runs.txt).
# The defaults take about 2.5 minutes on a 2-CPU machine.
#
# Needs bash, coreutils, taskset (util-linux), awk, and Go to build. Linux
# only (/proc). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6s}
ECHO_CONNS=${ECHO_CONNS:-32}
ECHO_SIZE=${ECHO_SIZE:-64}
CHURN_CONNS=${CHURN_CONNS:-16}
IDLE_CONNS=${IDLE_CONNS:-1000}
IDLE_DURATION=${IDLE_DURATION:-3s}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
OUT=${OUT:-$(mktemp -d /tmp/sockfsm-compare.XXXXXX)}
SERVERS=(sockfsm plain)
read -ra MODES <<<"${MODES:-echo churn idle}"

say() { printf '%s\n' "$*" >&2; }
# shellcheck source=bench/lib.sh
source bench/lib.sh
die() { say "compare.sh: $*"; exit 1; }

[[ $ROUNDS =~ ^[0-9]+$ ]] && ((ROUNDS >= 1 && ROUNDS <= 50)) || die "ROUNDS=$ROUNDS: want 1 to 50"
((${#MODES[@]} > 0)) || die "MODES is empty: want some of echo churn idle"
for mode in "${MODES[@]}"; do
	case $mode in echo | churn | idle) ;; *) die "MODES: unknown mode $mode: want some of echo churn idle" ;; esac
done
for tool in taskset awk getconf go; do
	command -v "$tool" >/dev/null || die "$tool not found"
done
CLK_TCK=$(getconf CLK_TCK)
mkdir -p "$OUT/bin"
: >"$OUT/runs.txt"

say "== building into $OUT/bin"
go build -o "$OUT/bin/server" ./cmd/server
go build -o "$OUT/bin/plainecho" ./bench/plainecho
go build -o "$OUT/bin/loadgen" ./cmd/loadgen

# kv KEY LINE: the value of KEY in a key=value line.
kv() {
	printf '%s\n' "$2" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { print $2; exit }'
}

# start_server NAME LOG: starts the server pinned to SERVER_CPU; sets
# SRV_PID and SRV_ADDR (bench/lib.sh).
start_server() {
	case $1 in
	sockfsm) launch "$1" "$2" "$OUT/bin/server" -addr 127.0.0.1:0 -log-level info ;;
	plain) launch "$1" "$2" "$OUT/bin/plainecho" -addr 127.0.0.1:0 ;;
	esac
}

failures=0

# run_one MODE NAME ROUND: one fresh server, one load; appends the metric to
# $OUT/NAME.MODE.{cpu,p99,kib}.
run_one() {
	local mode=$1 name=$2 round=$3 line t0 t1 rc=0
	local log="$OUT/$name.$mode.$round.log"
	start_server "$name" "$log"
	local args=(-mode "$mode" -addr "$SRV_ADDR")
	case $mode in
	echo) args+=(-conns "$ECHO_CONNS" -size "$ECHO_SIZE" -duration "$DURATION") ;;
	churn) args+=(-conns "$CHURN_CONNS" -duration "$DURATION") ;;
	idle) args+=(-conns "$IDLE_CONNS" -duration "$IDLE_DURATION" -pid "$SRV_PID") ;;
	esac
	t0=$(cpu_ticks "$SRV_PID")
	line=$(taskset -c "$LOADGEN_CPU" "$OUT/bin/loadgen" "${args[@]}" 2>>"$OUT/loadgen.log" | tail -n 1) || rc=$?
	t1=$(cpu_ticks "$SRV_PID")
	stop_server
	printf 'round=%s server=%s ticks=%s loadavg=%s %s\n' "$round" "$name" "$((t1 - t0))" "$(cut -d' ' -f1 /proc/loadavg)" "$line" >>"$OUT/runs.txt"
	[[ $line == loadgen* ]] || die "loadgen printed no result for $name $mode (see $OUT/loadgen.log)"
	local ops errs
	ops=$(kv ops "$line")
	errs=$(($(kv errors "$line") + $(kv resets "$line") + $(kv mismatches "$line")))
	if ((rc != 0 || errs != 0)); then
		failures=$((failures + 1))
		say "warning: $name $mode round $round: exit $rc, $errs failed ops: $line"
	fi
	case $mode in
	echo | churn)
		awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$ops" 'BEGIN { printf "%.6f\n", (n > 0 ? t * 1e6 / hz / n : 0) }' >>"$OUT/$name.$mode.cpu"
		kv p99_us "$line" >>"$OUT/$name.$mode.p99"
		say "$(printf '%-7s %-5s round %d: %8s ops, server CPU %5s ticks, %s µs/op, p99 %s µs' \
			"$name" "$mode" "$round" "$ops" "$((t1 - t0))" "$(tail -n 1 "$OUT/$name.$mode.cpu")" "$(kv p99_us "$line")")"
		;;
	idle)
		kv kib_per_conn "$line" >>"$OUT/$name.$mode.kib"
		say "$(printf '%-7s %-5s round %d: %8s conns, RSS %s -> %s KiB, %s KiB/conn' \
			"$name" "$mode" "$round" "$ops" "$(kv rss_before_kib "$line")" "$(kv rss_after_kib "$line")" "$(kv kib_per_conn "$line")")"
		;;
	esac
}

rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then rev+="+dirty"; fi
say "== sockfsm $rev; $(nproc) CPUs; $(go version)"
say "== $ROUNDS rounds; servers on CPU $SERVER_CPU, loadgen on CPU $LOADGEN_CPU; CLK_TCK=$CLK_TCK; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
	for mode in "${MODES[@]}"; do
		for name in "${SERVERS[@]}"; do
			run_one "$mode" "$name" "$round"
		done
	done
done

# median FILE
median() {
	sort -g "$1" | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.6f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f\n", a / b; else print "nan" }'; }
# paired A B: the median over rounds of each round's ratio A/B (lines in
# round order). Rounds interleave the servers, so a round's ratio compares
# them under the same conditions; informational, the verdict uses ratio.
paired() {
	paste "$1" "$2" | awk '$2 > 0 { print $1 / $2 }' >"$OUT/paired.tmp"
	median "$OUT/paired.tmp" | awk '{ if ($1 == "nan") print "nan"; else printf "%.3f\n", $1 }'
}
# verdict A B TARGET: met if A/B <= TARGET, computed unrounded.
verdict() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { print (a != "nan" && b + 0 > 0 && a / b <= t + 0) ? "met" : "NOT met" }'; }

line="compare rounds=$ROUNDS"
say ""
say "== load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other processes share these CPUs: see the caveats in docs/performance.md)"
say "== medians over $ROUNDS rounds (all runs: $OUT/runs.txt)"
say "$(printf '%-22s %12s %12s %14s %8s %8s  %s' metric sockfsm plain sockfsm/plain paired target verdict)"
report() {
	local key=$1 label=$2 file=$3 target=$4 a b r pr
	a=$(median "$OUT/sockfsm.$file")
	b=$(median "$OUT/plain.$file")
	r=$(ratio "$a" "$b")
	pr=$(paired "$OUT/sockfsm.$file" "$OUT/plain.$file")
	say "$(printf '%-22s %12s %12s %14s %8s %8s  %s' "$label" "$a" "$b" "$r" "$pr" "≤$target" "$(verdict "$a" "$b" "$target")")"
	line+=" ${key}_sockfsm=$a ${key}_plain=$b ${key}_ratio=$r ${key}_paired=$pr"
}
ran() { [[ " ${MODES[*]} " == *" $1 "* ]]; }
if ran echo; then
	report echo_cpu_us "echo CPU µs/op" echo.cpu 1.05
	report echo_p99_us "echo p99 µs" echo.p99 1.1
fi
if ran churn; then
	report churn_cpu_us "churn CPU µs/conn" churn.cpu 1.05
	report churn_p99_us "churn p99 µs" churn.p99 1.1
fi
if ran idle; then
	report idle_kib "idle KiB/conn" idle.kib 1.25
fi
line+=" failures=$failures"
if ((failures > 0)); then
	say "warning: $failures runs had failed ops or a non-zero exit; see $OUT/runs.txt"
fi
printf '%s\n' "$line"
