#!/usr/bin/env bash
# Show (and follow) the log files that tpu/run.sh writes on the TPU workers.
# shellcheck disable=SC2016  # single-quoted $HOME/$f/... are meant to expand on the workers
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$TPU_DIR/common.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: tpu/logs.sh [-n LINES] [--no-follow] [--run RUN_NAME]

Tail ~/meljax-logs/RUN_NAME/worker-ID.log on the chosen workers (default: worker 0, which is
process 0, the one that logs metrics). Lines are prefixed with '[worker ID]'. Ctrl-C stops.

Options:
  -n LINES        lines of history to show first (default 100)
  --no-follow     print and exit instead of following
  --run RUN_NAME  which run (default: RUN_NAME setting, else the latest run)
  -h, --help      show this help

Settings for this script:
  WORKER     0 (default), a list such as 0,3, or all
  RUN_NAME   default run
EOF_USAGE
  print_settings_help
}

LINES_BACK=100
FOLLOW=1
RUN_ARG=""
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    -n)
      (($# >= 2)) || usage_error "-n needs a number"
      LINES_BACK=$2
      shift
      ;;
    --no-follow) FOLLOW=0 ;;
    --run)
      (($# >= 2)) || usage_error "--run needs a run name"
      RUN_ARG=$2
      shift
      ;;
    --run=*) RUN_ARG=${1#--run=} ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done
[[ $LINES_BACK =~ ^[0-9]+$ ]] || usage_error "-n '$LINES_BACK' is not a number"

load_settings
resolve_location
WORKER=${WORKER:-0}
check_worker "$WORKER"
RUN=${RUN_ARG:-${RUN_NAME:-latest}}
[[ $RUN == latest ]] || check_run_name "$RUN"

follow_flag=""
((FOLLOW)) && follow_flag=" -F"
remote=(
  "set -- \"\$HOME\"/$REMOTE_LOGS/$RUN/worker-*.log"
  "if [ ! -e \"\$1\" ]; then echo \"\$(hostname): no log for run $RUN in ~/$REMOTE_LOGS\" >&2; exit 1; fi"
  'f=${1##*/worker-}; ID=${f%.log}'
  "tail -n $LINES_BACK$follow_flag \"\$@\" | sed -u \"s/^/[worker \$ID] /\""
)
remote_text=""
for statement in "${remote[@]}"; do
  remote_text+="${remote_text:+; }$statement"
done
ssh_workers "$WORKER" "$remote_text"
