#!/usr/bin/env bash
# Start one command (normally 'meljax train ...') on every TPU worker at once, detached.
# shellcheck disable=SC2016  # single-quoted $HOME/$ID/... are meant to expand on the workers
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$TPU_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu/run.sh [--name RUN_NAME] [--env KEY=VALUE]... [--] COMMAND [ARGS...]

Start COMMAND on all workers of the slice (--worker=all), detached in a tmux session named
'meljax' (nohup when tmux is missing), inside ~/REMOTE_DIR with the venv activated.
Each worker writes ~/meljax-logs/RUN_NAME/worker-ID.log; ~/meljax-logs/latest points to the
newest run. Refuses to start while a run is active on a worker (see tpu/stop.sh).

COMMAND is 'meljax SUBCOMMAND ...' (train/eval/sample/convert/report may omit 'meljax') or
any other program, e.g. python -c 'import jax; print(jax.device_count())'.
Arguments are passed through exactly, spaces and quotes included. Multi-host set-up needs no
flags: the CLI calls jax.distributed.initialize() itself when it finds several TPU hosts.

Options:
  --name RUN_NAME   log folder name (default: RUN_NAME setting, else run-YYYYmmdd-HHMMSS)
  --env KEY=VALUE   export KEY=VALUE for the command (repeatable), e.g. --env LIBTPU_INIT_ARGS=...
  -h, --help        show this help

Settings for this script:
  WORKDIR      added as --workdir=WORKDIR to 'meljax train/eval' when no --workdir is given
               (a gs:// path: orbax writes WORKDIR/checkpoints there, readable by every host)
  RUN_NAME     default run name
  REMOTE_DIR / REMOTE_VENV   as in tpu/setup.sh (defaults meljax, meljax-venv)

Example:
  tpu/run.sh --name qwen3-8b-mel -- meljax train --config=configs/qwen3_paper.py:8b,mel \
      --workdir=gs://BUCKET/runs/qwen3-8b-mel
EOF
  print_settings_help
}

ENV_ASSIGNMENTS=()
NAME_ARG=""
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --name)
      (($# >= 2)) || usage_error "--name needs a value"
      NAME_ARG=$2
      shift
      ;;
    --name=*) NAME_ARG=${1#--name=} ;;
    --env)
      (($# >= 2)) || usage_error "--env needs KEY=VALUE"
      ENV_ASSIGNMENTS+=("$2")
      shift
      ;;
    --env=*) ENV_ASSIGNMENTS+=("${1#--env=}") ;;
    --)
      shift
      break
      ;;
    -*) usage_error "unknown option '$1' (put the command after --)" ;;
    *) break ;;
  esac
  shift
done
(($#)) || usage_error "no command given, e.g. tpu/run.sh meljax train --config=configs/X.py"
CMD=("$@")

load_settings
resolve_location
check_remote_dir REMOTE_DIR "$REMOTE_DIR"
check_remote_dir REMOTE_VENV "$REMOTE_VENV"

RUN_NAME=${NAME_ARG:-${RUN_NAME:-run-$(date -u +%Y%m%d-%H%M%S)}}
check_run_name "$RUN_NAME"

case ${CMD[0]} in
  train | eval | sample | convert | report) CMD=(meljax "${CMD[@]}") ;;
esac

# WORKDIR fills in --workdir for the subcommands that write a work directory.
if [[ ${CMD[0]} == meljax && -n ${WORKDIR:-} && ${CMD[1]:-} =~ ^(train|eval)$ ]]; then
  has_workdir=0
  for arg in "${CMD[@]:2}"; do
    [[ $arg == --workdir || $arg == --workdir=* ]] && has_workdir=1
  done
  ((has_workdir)) || CMD+=("--workdir=$WORKDIR")
fi

export_lines=()
for assignment in "${ENV_ASSIGNMENTS[@]}"; do
  [[ $assignment =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] ||
    usage_error "--env '$assignment' is not KEY=VALUE"
  export_lines+=("export ${BASH_REMATCH[1]}=$(shell_quote "${BASH_REMATCH[2]}")")
done

CMD_TEXT=$(quote_args "${CMD[@]}")
RDIR=$(remote_path "$REMOTE_DIR")
RVENV=$(remote_path "$REMOTE_VENV")

# The launcher runs on a worker as: bash launch.sh LOG_FILE WORKER_ID. It keeps the shell
# alive around the command so the exit status lands in the log.
launcher=(
  '#!/usr/bin/env bash'
  "# meljax run $RUN_NAME, written by tpu/run.sh. Usage: bash launch.sh LOG_FILE WORKER_ID"
  'exec >>"$1" 2>&1'
  "cd $RDIR || exit 1"
  "source $RVENV/bin/activate || exit 1"
  "${export_lines[@]}"
  "cmd=($CMD_TEXT)"
  'printf "[meljax-tpu] %s worker %s run %s: %s\n" "$(date -u +%FT%TZ)" "$2" '"$RUN_NAME"' "${cmd[*]}"'
  '"${cmd[@]}"'
  'rc=$?'
  'printf "[meljax-tpu] %s worker %s: exit status %s\n" "$(date -u +%FT%TZ)" "$2" "$rc"'
  'exit "$rc"'
)

remote=(
  'set -e'
  "$(remote_worker_id_snippet)"
  "L=\"\$HOME\"/$REMOTE_LOGS"
  "D=\$L/$RUN_NAME"
  "if { command -v tmux >/dev/null 2>&1 && tmux has-session -t $TMUX_SESSION 2>/dev/null; } || { [ -f \"\$L/current.pid\" ] && kill -0 \"\$(cat \"\$L/current.pid\")\" 2>/dev/null; }; then echo \"worker \$ID: a meljax run is already active; stop it first with tpu/stop.sh\" >&2; exit 1; fi"
  'mkdir -p "$D"'
  "printf \"%s\\n\" $(quote_args "${launcher[@]}") > \"\$D/launch.sh\""
  "ln -sfn $RUN_NAME \"\$L/latest\""
  'LOG=$D/worker-$ID.log'
  "if command -v tmux >/dev/null 2>&1; then tmux new-session -d -s $TMUX_SESSION \"bash \\\"\$D/launch.sh\\\" \\\"\$LOG\\\" \\\"\$ID\\\"\"; else setsid nohup bash \"\$D/launch.sh\" \"\$LOG\" \"\$ID\" </dev/null >/dev/null 2>&1 & echo \$! > \"\$L/current.pid\"; fi"
  "echo \"worker \$ID: started run $RUN_NAME, log \$LOG\""
)
remote_text=""
for statement in "${remote[@]}"; do
  remote_text+="${remote_text:+; }$statement"
done

info "run '$RUN_NAME' on every worker of $TPU_NAME: $CMD_TEXT"
ssh_workers all "$remote_text"
info "logs: tpu/logs.sh (WORKER=all for every worker); stop: tpu/stop.sh"
