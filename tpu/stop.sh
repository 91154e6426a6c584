#!/usr/bin/env bash
# Stop the meljax run on every TPU worker (SIGTERM, then SIGKILL after a grace period).
# shellcheck disable=SC2016  # single-quoted $HOME/$P/... are meant to expand on the workers
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$TPU_DIR/common.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: tpu/stop.sh [--grace SECONDS] [--force]

On all workers: send SIGTERM to the process group of the run started by tpu/run.sh (tmux
session 'meljax', or the nohup pid file), wait up to the grace period, then SIGKILL and close
the tmux session. Checkpoints already written to WORKDIR stay; rerun the same command to resume.

Options:
  --grace SECONDS   wait this long after SIGTERM (default 20)
  --force           also kill (sudo) any process still holding the TPU devices
                    (/dev/accel*, /dev/vfio/*), for 'TPU in use' errors at the next start
  -h, --help        show this help
EOF_USAGE
  print_settings_help
}

GRACE=20
FORCE=0
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --grace)
      (($# >= 2)) || usage_error "--grace needs a number of seconds"
      GRACE=$2
      shift
      ;;
    --grace=*) GRACE=${1#--grace=} ;;
    --force) FORCE=1 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done
[[ $GRACE =~ ^[0-9]+$ ]] || usage_error "--grace '$GRACE' is not a number of seconds"

load_settings
resolve_location

remote=(
  "L=\"\$HOME\"/$REMOTE_LOGS"
  'P=""'
  "if command -v tmux >/dev/null 2>&1 && tmux has-session -t $TMUX_SESSION 2>/dev/null; then P=\$(tmux list-panes -s -t $TMUX_SESSION -F '#{pane_pid}'); fi"
  'if [ -f "$L/current.pid" ]; then P="$P $(cat "$L/current.pid")"; rm -f "$L/current.pid"; fi'
  'for p in $P; do kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true; done'
  "for i in \$(seq $GRACE); do alive=\"\"; for p in \$P; do if kill -0 \"\$p\" 2>/dev/null; then alive=1; fi; done; if [ -z \"\$alive\" ]; then break; fi; sleep 1; done"
  'for p in $P; do kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true; done'
  "tmux kill-session -t $TMUX_SESSION 2>/dev/null || true"
)
if ((FORCE)); then
  remote+=('for p in $(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u); do sudo kill -KILL "$p" || true; done')
fi
remote+=('if [ -n "${P// /}" ]; then echo "$(hostname): stopped $P"; else echo "$(hostname): no meljax run found"; fi')
remote_text=""
for statement in "${remote[@]}"; do
  remote_text+="${remote_text:+; }$statement"
done

info "stopping the run on every worker of $TPU_NAME"
ssh_workers all "$remote_text"
