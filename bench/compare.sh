#!/usr/bin/env bash
# compare.sh: sockfsm's echo server (cmd/server) against three other echo
# servers, as processes, over loopback TCP, loaded by bench/loadgen:
#
#   sockfsm       cmd/server, the goroutine driver (-driver goroutine when
#                 the server has the flag)
#   sockfsm-loop  cmd/server -driver loop: run only when `server -h` lists
#                 -driver (the event-loop driver, issue 11)
#   sockfsm-loop-tcp  the same with GODEBUG=multipathtcp=0: a plain TCP
#                 listener, as gnet's is, where cmd/server's (net.Listen's
#                 since Go 1.24) is MPTCP; run only when SERVERS names it
#   plain         bench/plainecho: goroutine per connection, the same
#                 graceful close and timeouts as sockfsm
#   minimal       bench/minimal: goroutine per connection, no deadlines,
#                 close on EOF; the floor for p99
#   gnet          bench/gnetecho: gnet v2.9.7 with $GNET_LOOPS event loops
#                 (1), built in its own module; the floor for CPU
#
# Each server runs pinned to CPU $SERVER_CPU and loadgen to CPU $LOADGEN_CPU
# (taskset), so the server's Go runtime sees one CPU. For every round, every
# mode and then every server (sockfsm, sockfsm-loop, plain, minimal, gnet,
# sockfsm, ...), a fresh server is started and loaded once:
#
#   echo   $ECHO_CONNS persistent connections, $ECHO_SIZE-byte round trips
#   churn  $CHURN_CONNS workers: connect, 14 bytes, half-close, read to EOF, close
#   idle   $IDLE_CONNS connections from the source addresses $IDLE_SOURCES,
#          each echoes one byte and then idles for $IDLE_DURATION; then
#          loadgen sends the server SIGTERM (-shutdown) and counts how the
#          server closes them: FIN (graceful) or RST
#
# echo and churn report the server's CPU time per op (utime+stime from
# /proc/PID/stat before and after the load, in clock ticks of
# `getconf CLK_TCK`, divided by the ops) and loadgen's p99 latency. idle
# reports the server's RSS growth per connection (loadgen -pid: VmRSS
# before the first connect and with every connection open), the time from
# SIGTERM to the last connection closed, and the connections reset.
#
# The medians over the rounds are printed as a table on stderr, each with
# its ratio to minimal's and to gnet's median, and beside each the paired
# ratio: the median of each round's own ratio. This machine switches between
# a fast and a slow state (about 25% apart) from one load to the next; the
# loads of one round usually share one, while the medians of two servers may
# not (docs/performance.md). Then one line on stdout:
#
#   compare rounds=3 servers=sockfsm,plain,minimal,gnet echo_cpu_us_sockfsm=.. echo_cpu_us_sockfsm_vs_minimal=.. ... failures=0
#
# with, for each metric (echo_cpu_us, echo_p99_us, churn_cpu_us,
# churn_p99_us, idle_kib, idle_shutdown_ms) and server (sockfsm-loop as
# sockfsm_loop): METRIC_SERVER (the median), METRIC_SERVER_vs_minimal and
# METRIC_SERVER_vs_gnet (ratios of the medians), METRIC_SERVER_paired_minimal
# and METRIC_SERVER_paired_gnet; idle_resets_SERVER (summed over the
# rounds); and failures: the runs with failed ops (errors, resets,
# mismatches) or a non-zero exit.
#
# The targets are issue 11's, for sockfsm-loop (shown for sockfsm too):
# CPU per echo round trip and per churn lifecycle at or below gnet's, p99
# at or below minimal's (each ratio of medians at most 1, unrounded), idle
# RSS at most 1 KiB per connection, and a shutdown that resets none.
#
# Settings (environment): ROUNDS (5), DURATION (6s, echo and churn),
# MODES ("echo churn idle": which loads to run, and report), SERVERS (all
# of the above that can run, but sockfsm-loop-tcp), ECHO_CONNS (32), ECHO_SIZE (64), CHURN_CONNS
# (16), IDLE_CONNS (19000: with the server and loadgen each limited to
# 20,000 open files), IDLE_SOURCES (127.0.0.2-127.0.0.5: one address has
# about 28,000 ephemeral ports), IDLE_DURATION (3s), GNET_LOOPS (1),
# SERVER_CPU (0), LOADGEN_CPU (1), OUT (a new directory under /tmp:
# binaries, server logs, every loadgen line in runs.txt). The defaults take
# about 8 minutes on a 2-CPU machine.
#
# Needs bash, coreutils, taskset (util-linux), awk, and Go to build (gnet
# from the Go module proxy, or the module cache). Linux only (/proc).
# Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6s}
ECHO_CONNS=${ECHO_CONNS:-32}
ECHO_SIZE=${ECHO_SIZE:-64}
CHURN_CONNS=${CHURN_CONNS:-16}
IDLE_CONNS=${IDLE_CONNS:-19000}
IDLE_SOURCES=${IDLE_SOURCES:-127.0.0.2-127.0.0.5}
IDLE_DURATION=${IDLE_DURATION:-3s}
GNET_LOOPS=${GNET_LOOPS:-1}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
OUT=${OUT:-$(mktemp -d /tmp/sockfsm-compare.XXXXXX)}
read -ra MODES <<<"${MODES:-echo churn idle}"

say() { printf '%s\n' "$*" >&2; }
# shellcheck source=bench/lib.sh
source bench/lib.sh
trap kill_server EXIT
die() { say "compare.sh: $*"; exit 1; }

[[ $ROUNDS =~ ^[0-9]+$ ]] && ((ROUNDS >= 1 && ROUNDS <= 50)) || die "ROUNDS=$ROUNDS: want 1 to 50"
((${#MODES[@]} > 0)) || die "MODES is empty: want some of echo churn idle"
for mode in "${MODES[@]}"; do
	case $mode in echo | churn | idle) ;; *) die "MODES: unknown mode $mode: want some of echo churn idle" ;; esac
done
for tool in taskset awk getconf go; do
	command -v "$tool" >/dev/null || die "$tool not found"
done
[[ $IDLE_CONNS =~ ^[0-9]+$ ]] && ((IDLE_CONNS >= 1)) || die "IDLE_CONNS=$IDLE_CONNS: want a positive number"
if [[ " ${MODES[*]} " == *" idle "* ]]; then
	hard=$(ulimit -Hn)
	[[ $hard == unlimited ]] || ((IDLE_CONNS + 100 <= hard)) ||
		die "IDLE_CONNS=$IDLE_CONNS: the server and loadgen each need about $((IDLE_CONNS + 100)) open files; the hard limit is $hard"
fi
CLK_TCK=$(getconf CLK_TCK)
mkdir -p "$OUT/bin"
: >"$OUT/runs.txt"

say "== building into $OUT/bin"
go build -o "$OUT/bin/server" ./cmd/server
go build -o "$OUT/bin/plainecho" ./bench/plainecho
go build -o "$OUT/bin/minimal" ./bench/minimal
go build -o "$OUT/bin/loadgen" ./bench/loadgen
# gnet lives in a module of its own, so that sockfsm's go.mod does not carry
# it; -mod=mod lets go fetch what its go.sum names on a fresh machine.
(cd bench/gnetecho && GOWORK=off GOFLAGS=-mod=mod go build -o "$OUT/bin/gnetecho" .)

# The event-loop driver is there once the server has -driver. (The help is
# read whole first: with pipefail, grep -q closing the pipe early could make
# the server's -h die of SIGPIPE and the test fail at random; and sockfsm,
# whose default is the loop on Linux, would then run without -driver
# goroutine.)
driver=false
help=$("$OUT/bin/server" -h 2>&1 || true)
if [[ $help == *-driver* ]]; then
	driver=true
fi
ALL=(sockfsm)
$driver && ALL+=(sockfsm-loop)
ALL+=(plain minimal gnet)
# KNOWN: ALL and the servers run only when SERVERS names them.
KNOWN=("${ALL[@]}")
$driver && KNOWN+=(sockfsm-loop-tcp)
if [[ -n ${SERVERS:-} ]]; then
	read -ra SERVERS <<<"$SERVERS"
	for name in "${SERVERS[@]}"; do
		[[ " ${KNOWN[*]} " == *" $name "* ]] || die "SERVERS: $name is not one of: ${KNOWN[*]}"
	done
else
	SERVERS=("${ALL[@]}")
fi

# kv KEY LINE: the value of KEY in a key=value line.
kv() {
	printf '%s\n' "$2" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { print $2; exit }'
}

# start_server NAME LOG: starts the server pinned to SERVER_CPU; sets
# SRV_PID and SRV_ADDR (bench/lib.sh).
start_server() {
	local drv=()
	case $1 in
	sockfsm)
		$driver && drv=(-driver goroutine)
		launch "$1" "$2" "$OUT/bin/server" -addr 127.0.0.1:0 -log-level info "${drv[@]}"
		;;
	sockfsm-loop) launch "$1" "$2" "$OUT/bin/server" -addr 127.0.0.1:0 -log-level info -driver loop ;;
	sockfsm-loop-tcp) launch "$1" "$2" env GODEBUG="${GODEBUG:+$GODEBUG,}multipathtcp=0" "$OUT/bin/server" -addr 127.0.0.1:0 -log-level info -driver loop ;;
	plain) launch "$1" "$2" "$OUT/bin/plainecho" -addr 127.0.0.1:0 ;;
	minimal) launch "$1" "$2" "$OUT/bin/minimal" -addr 127.0.0.1:0 ;;
	gnet) launch "$1" "$2" "$OUT/bin/gnetecho" -addr 127.0.0.1:0 -loops "$GNET_LOOPS" ;;
	esac
}

failures=0

# run_one MODE NAME ROUND: one fresh server, one load; appends the metrics
# to $OUT/NAME.MODE.{cpu,p99} or $OUT/NAME.idle.{kib,shut,rst}.
run_one() {
	local mode=$1 name=$2 round=$3 line t0 t1 ticks=- rc=0
	local log="$OUT/$name.$mode.$round.log"
	start_server "$name" "$log"
	local args=(-mode "$mode" -addr "$SRV_ADDR" -pid "$SRV_PID")
	case $mode in
	echo) args+=(-conns "$ECHO_CONNS" -size "$ECHO_SIZE" -duration "$DURATION") ;;
	churn) args+=(-conns "$CHURN_CONNS" -duration "$DURATION") ;;
	idle) args+=(-conns "$IDLE_CONNS" -duration "$IDLE_DURATION" -sources "$IDLE_SOURCES" -shutdown) ;;
	esac
	t0=$(cpu_ticks "$SRV_PID")
	line=$(taskset -c "$LOADGEN_CPU" "$OUT/bin/loadgen" "${args[@]}" 2>>"$OUT/loadgen.log" | tail -n 1) || rc=$?
	# After idle's SIGTERM the server may be gone: its CPU is not reported.
	[[ $mode == idle ]] || { t1=$(cpu_ticks "$SRV_PID") && ticks=$((t1 - t0)); }
	stop_server
	printf 'round=%s server=%s ticks=%s loadavg=%s %s\n' "$round" "$name" "$ticks" "$(cut -d' ' -f1 /proc/loadavg)" "$line" >>"$OUT/runs.txt"
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
		awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$ops" 'BEGIN { printf "%.6f\n", (n > 0 ? t * 1e6 / hz / n : 0) }' >>"$OUT/$name.$mode.cpu"
		kv p99_us "$line" >>"$OUT/$name.$mode.p99"
		say "$(printf '%-16s %-5s round %d: %8s ops, server CPU %5s ticks, %s µs/op, p99 %s µs' \
			"$name" "$mode" "$round" "$ops" "$ticks" "$(tail -n 1 "$OUT/$name.$mode.cpu")" "$(kv p99_us "$line")")"
		;;
	idle)
		kv kib_per_conn "$line" >>"$OUT/$name.idle.kib"
		kv shutdown_ms "$line" >>"$OUT/$name.idle.shut"
		kv resets "$line" >>"$OUT/$name.idle.rst"
		say "$(printf '%-16s %-5s round %d: %8s conns, RSS %s -> %s KiB, %s KiB/conn; SIGTERM: %s FIN, %s RST in %s ms' \
			"$name" "$mode" "$round" "$ops" "$(kv rss_before_kib "$line")" "$(kv rss_after_kib "$line")" "$(kv kib_per_conn "$line")" \
			"$(kv eofs "$line")" "$(kv resets "$line")" "$(kv shutdown_ms "$line")")"
		;;
	esac
}

rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then rev+="+dirty"; fi
say "== sockfsm $rev; $(nproc) CPUs; $(go version)"
say "== $ROUNDS rounds of ${MODES[*]}; servers: ${SERVERS[*]}"
$driver || say "== cmd/server has no -driver: sockfsm-loop is pending the event-loop driver"
say "== servers on CPU $SERVER_CPU, loadgen on CPU $LOADGEN_CPU; CLK_TCK=$CLK_TCK; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
	for mode in "${MODES[@]}"; do
		for name in "${SERVERS[@]}"; do
			run_one "$mode" "$name" "$round"
		done
	done
done

# ratio A B: A/B to 3 decimals, nan if B is not positive.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "nan" && b + 0 > 0) printf "%.3f\n", a / b; else print "nan" }'; }
# paired A B: the median over rounds of each round's ratio A/B (files of one
# value a line, in round order). Rounds interleave the servers, so a round's
# ratio compares them under the same conditions.
paired() {
	[[ -s $1 && -s $2 ]] || { echo nan; return; }
	paste "$1" "$2" | awk '$2 > 0 { print $1 / $2 }' >"$OUT/paired.tmp"
	median "$OUT/paired.tmp" | awk '{ if ($1 == "nan") print "nan"; else printf "%.3f\n", $1 }'
}
# at_most A B TARGET: met if A/B <= TARGET (B empty: A <= TARGET), unrounded.
at_most() {
	awk -v a="$1" -v b="${2:-1}" -v t="$3" 'BEGIN { print (a != "nan" && b != "nan" && b + 0 > 0 && a / b <= t + 0) ? "met" : "NOT met" }'
}
# med FILE: the median, nan if the file is missing or empty.
med() { if [[ -s $1 ]]; then median "$1"; else echo nan; fi; }
ran() { [[ " ${MODES[*]} " == *" $1 "* ]]; }
served() { [[ " ${SERVERS[*]} " == *" $1 "* ]]; }

line="compare rounds=$ROUNDS servers=$(
	IFS=,
	echo "${SERVERS[*]}"
)"
say ""
say "== load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other processes share these CPUs: see the caveats in docs/performance.md)"
say "== medians over $ROUNDS rounds; ratios to minimal's and gnet's medians, and the paired ratios (all runs: $OUT/runs.txt)"
# report KEY LABEL FILE TARGET: one block of the table, one row a server.
# TARGET: "gnet" (ratio to gnet's at most 1), "minimal" (to minimal's at
# most 1) or a number (the median at most that).
report() {
	local key=$1 label=$2 file=$3 target=$4 name a v
	local m g
	m=$(med "$OUT/minimal.$file")
	g=$(med "$OUT/gnet.$file")
	case $target in
	gnet | minimal) label+=" (target: sockfsm-loop ≤ $target's)" ;;
	*) label+=" (target: sockfsm-loop ≤ $target)" ;;
	esac
	say ""
	say "$label"
	say "$(printf '  %-16s %11s %9s %8s %9s %8s  %s' server median /minimal paired /gnet paired verdict)"
	for name in "${KNOWN[@]}"; do
		served "$name" || continue
		a=$(med "$OUT/$name.$file")
		local vm pm vg pg verdict=""
		vm=$(ratio "$a" "$m")
		pm=$(paired "$OUT/$name.$file" "$OUT/minimal.$file")
		vg=$(ratio "$a" "$g")
		pg=$(paired "$OUT/$name.$file" "$OUT/gnet.$file")
		if [[ $name == sockfsm* ]]; then
			case $target in
			gnet) verdict=$(at_most "$a" "$g" 1) ;;
			minimal) verdict=$(at_most "$a" "$m" 1) ;;
			*) verdict=$(at_most "$a" "" "$target") ;;
			esac
		fi
		say "$(printf '  %-16s %11s %9s %8s %9s %8s  %s' "$name" "$a" "$vm" "$pm" "$vg" "$pg" "$verdict")"
		v=${name//-/_}
		line+=" ${key}_$v=$a ${key}_${v}_vs_minimal=$vm ${key}_${v}_paired_minimal=$pm ${key}_${v}_vs_gnet=$vg ${key}_${v}_paired_gnet=$pg"
	done
	$driver || say "  sockfsm-loop: pending the event-loop driver (cmd/server has no -driver yet)"
}
if ran echo; then
	report echo_cpu_us "echo: server CPU µs per round trip" echo.cpu gnet
	report echo_p99_us "echo: p99 µs" echo.p99 minimal
fi
if ran churn; then
	report churn_cpu_us "churn: server CPU µs per connection lifecycle" churn.cpu gnet
	report churn_p99_us "churn: p99 µs" churn.p99 minimal
fi
if ran idle; then
	report idle_kib "idle: RSS KiB per connection, $IDLE_CONNS connections" idle.kib 1
	report idle_shutdown_ms "idle: ms from SIGTERM to the last connection closed" idle.shut 10000
	say ""
	say "idle: connections reset by the shutdown, all rounds (target: 0)"
	for name in "${KNOWN[@]}"; do
		served "$name" || continue
		n=$(awk '{ s += $1 } END { print s + 0 }' "$OUT/$name.idle.rst")
		say "$(printf '  %-16s %11s  %s' "$name" "$n" "$([[ $name == sockfsm* ]] && at_most "$n" "" 0)")"
		line+=" idle_resets_${name//-/_}=$n"
	done
fi
line+=" failures=$failures"
if ((failures > 0)); then
	say "warning: $failures runs had failed ops or a non-zero exit; see $OUT/runs.txt"
fi
printf '%s\n' "$line"
