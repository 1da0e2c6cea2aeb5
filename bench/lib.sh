# lib.sh: what bench/compare.sh and bench/http.sh share. Sourced, not run.
# The caller defines say and die, and sets SERVER_CPU.

# cpu_ticks PID: the process's utime+stime, in clock ticks. The fields are
# counted after the command name, which is in parentheses.
cpu_ticks() {
	awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

# launch NAME LOG CMD...: starts CMD pinned to SERVER_CPU, its stderr in
# LOG; sets SRV_PID and, from its "listening addr=..." log line, SRV_ADDR.
launch() {
	local name=$1 log=$2
	shift 2
	: >"$log" # before the reads below: the background job opens it in its own time
	taskset -c "$SERVER_CPU" "$@" 2>"$log" &
	SRV_PID=$!
	SRV_ADDR=
	for _ in $(seq 200); do
		SRV_ADDR=$(sed -n 's/.*msg=listening addr=\([^ ]*\).*/\1/p' "$log" | head -n 1)
		[[ -n $SRV_ADDR ]] && return 0
		kill -0 "$SRV_PID" 2>/dev/null || break
		sleep 0.05
	done
	cat "$log" >&2
	die "$name did not start listening"
}

# stop_server: SIGTERM (a graceful shutdown), then SIGKILL after 20s.
stop_server() {
	kill -TERM "$SRV_PID" 2>/dev/null || true
	for _ in $(seq 400); do
		kill -0 "$SRV_PID" 2>/dev/null || break
		sleep 0.05
	done
	if kill -0 "$SRV_PID" 2>/dev/null; then
		say "warning: server $SRV_PID ignored SIGTERM for 20s; killing it"
		kill -KILL "$SRV_PID" 2>/dev/null || true
	fi
	wait "$SRV_PID" 2>/dev/null || true
	SRV_PID=
}

# kill_server: on the way out (trap EXIT), kill a server still running: a
# script that dies between launch and stop_server leaves none behind.
kill_server() {
	if [[ -n ${SRV_PID:-} ]]; then
		kill -KILL "$SRV_PID" 2>/dev/null || true
	fi
}

# median FILE: the median of the numbers in FILE, one a line; nan if none.
median() {
	sort -g "$1" | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.6f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
