#!/usr/bin/env bash
# Delete the queued resource and its TPU node (asks for confirmation unless YES=1).
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$TPU_DIR/common.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: tpu/delete.sh [-y | --yes] [--async]

Delete the queued resource TPU_NAME together with its node ('queued-resources delete --force').
Everything on the workers' disks is lost; checkpoints in a gs:// WORKDIR stay.
Asks for confirmation unless -y/--yes or YES=1 (the environment only, not tpu/tpu.env).

Options:
  -y, --yes   do not ask
  --async     return without waiting for the deletion to finish
  -h, --help  show this help
EOF_USAGE
  print_settings_help
}

ASYNC=()
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    -y | --yes) YES=1 ;;
    --async) ASYNC=(--async) ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done

load_settings
resolve_location

if ! is_true "${YES:-0}" YES; then
  prompt="Delete queued resource and TPU node '$TPU_NAME' in $ZONE (project $PROJECT)?"
  dry_run && prompt="[dry run] $prompt"
  answer=""
  read -r -p "$prompt [y/N] " answer || true
  [[ ${answer,,} == y || ${answer,,} == yes ]] || die "not confirmed; nothing deleted (YES=1 skips this question)"
fi

run_gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOC_FLAGS[@]}" --force --quiet \
  "${ASYNC[@]}"
info "deleted '$TPU_NAME'"
