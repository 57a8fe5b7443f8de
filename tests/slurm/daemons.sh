# source'd by start-cluster.sh and stop-cluster.sh (needs STATE): which of the daemons
# start-cluster.sh launched still run. A pid file names one of our daemons only if that
# process is alive, runs the expected program and started at the time recorded when we
# launched it (guards against pid reuse).
pid_start_time() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null; }
our_daemon_pid() { # name -> prints pid if the daemon we started is running
    local name=$1 rec="$STATE/run/$1.started" pid start
    [ -f "$rec" ] || return 1
    read -r pid start <"$rec" || return 1
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    [ "$(pid_start_time "$pid")" = "$start" ] || return 1
    case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in
    *"$name"*) echo "$pid" ;;
    *) return 1 ;;
    esac
}
