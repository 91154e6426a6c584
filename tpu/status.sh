#!/usr/bin/env bash
# Show the queued-resource state, the node state and what runs on each TPU worker.
# shellcheck disable=SC2016  # single-quoted $HOME/... are meant to expand on the workers
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$TPU_DIR/common.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: tpu/status.sh [--no-workers]

Print the queued resource (WAITING_FOR_RESOURCES / PROVISIONING / ACTIVE / FAILED ...), the
node (state, health, accelerator) and, on each worker, 'tmux ls', the meljax processes and the
last lines of the latest run's log.

Options:
  --no-workers   skip the ssh to the workers (e.g. while the slice is still queued)
  -h, --help     show this help

Settings for this script:
  WORKER   workers to inspect (default: all)
EOF_USAGE
  print_settings_help
}

WORKERS_TOO=1
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --no-workers) WORKERS_TOO=0 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done

load_settings
resolve_location
WORKER=${WORKER:-all}
check_worker "$WORKER"

info "== queued resource $TPU_NAME"
run_gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOC_FLAGS[@]}" \
  "--format=table(name.basename(),state.state,tpu.nodeSpec[0].node.acceleratorType)" ||
  info "no queued resource named '$TPU_NAME' (or describe failed)"
info "== node $TPU_NAME"
if ! run_gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOC_FLAGS[@]}" \
  "--format=table(name.basename(),state,health,acceleratorType,runtimeVersion)"; then
  info "no node named '$TPU_NAME' yet"
  exit 0
fi
((WORKERS_TOO)) || exit 0

info "== workers ($WORKER)"
remote=(
  "$(remote_worker_id_snippet)"
  'echo "--- worker $ID ($H)"'
  "tmux ls 2>/dev/null || echo '(no tmux session)'"
  "pgrep -af '[m]eljax' || echo '(no meljax process)'"
  "tail -n 3 \"\$HOME\"/$REMOTE_LOGS/latest/worker-*.log 2>/dev/null || true"
)
remote_text=""
for statement in "${remote[@]}"; do
  remote_text+="${remote_text:+; }$statement"
done
ssh_workers "$WORKER" "$remote_text" || info "ssh to the workers failed (node not READY yet?)"
