#!/usr/bin/env bash
# Create a Cloud TPU VM slice as a queued resource and wait until it is ACTIVE.
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$TPU_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu/create.sh [--spot | --reserved | --best-effort] [--no-wait] [-- EXTRA_GCLOUD_FLAGS...]

Request a TPU slice with 'gcloud compute tpus queued-resources create' (queued resource and
node both named TPU_NAME), then poll until the request is ACTIVE (FAILED/SUSPENDED: error).

Options:
  --spot          Spot capacity (cheap, preemptible; same as SPOT=1)
  --reserved      consume your project's reservation (same as RESERVED=1)
  --best-effort   best-effort tier, uses 'gcloud alpha' (same as BEST_EFFORT=1)
  --no-wait       return right after the request is queued (same as NO_WAIT=1)
  -h, --help      show this help
  -- FLAGS...     passed to 'queued-resources create', e.g. -- --valid-until-duration=6h

Settings for this script:
  ACCELERATOR       accelerator type, e.g. v5p-32, v6e-16, v5litepod-8, v4-32 (required)
  RUNTIME_VERSION   TPU software version; default from the accelerator family:
                      v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
                      v5e/v5litepod -> v2-alpha-tpuv5-lite, v4 and older -> tpu-ubuntu2204-base
  SPOT / RESERVED / BEST_EFFORT   0 or 1; at most one of them
  NO_WAIT=1         do not poll
  POLL_INTERVAL     seconds between polls (default 30)
  WAIT_TIMEOUT      give up polling after this many seconds (default 0: wait forever)
EOF
  print_settings_help
}

EXTRA_ARGS=()
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --spot) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --best-effort) BEST_EFFORT=1 ;;
    --no-wait) NO_WAIT=1 ;;
    --)
      shift
      EXTRA_ARGS=("$@")
      break
      ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done

load_settings
require TPU_NAME ZONE ACCELERATOR
resolve_location
[[ $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "ACCELERATOR='$ACCELERATOR' does not look like an accelerator type (e.g. v5p-32, v6e-16)"
if [[ -z ${RUNTIME_VERSION:-} ]]; then
  RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR") ||
    die "no default RUNTIME_VERSION for ACCELERATOR=$ACCELERATOR; set RUNTIME_VERSION"
fi

tier_flags=()
is_true "${SPOT:-0}" SPOT && tier_flags+=(--spot)
is_true "${RESERVED:-0}" RESERVED && tier_flags+=(--reserved)
is_true "${BEST_EFFORT:-0}" BEST_EFFORT && tier_flags+=(--best-effort)
if ((${#tier_flags[@]} > 1)); then
  die "choose at most one of SPOT, RESERVED, BEST_EFFORT (got ${tier_flags[*]})"
fi
[[ $POLL_INTERVAL =~ ^[0-9]+$ && $POLL_INTERVAL -gt 0 ]] ||
  die "POLL_INTERVAL='$POLL_INTERVAL' must be a positive number of seconds"
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "WAIT_TIMEOUT='$WAIT_TIMEOUT' must be seconds (0: none)"

# The best-effort tier exists only in the alpha command group.
release=()
[[ ${tier_flags[*]-} == --best-effort ]] && release=(alpha)

info "requesting $ACCELERATOR ($RUNTIME_VERSION) as '$TPU_NAME' in $ZONE, project $PROJECT"
run_gcloud "${release[@]}" compute tpus queued-resources create "$TPU_NAME" \
  --node-id="$TPU_NAME" \
  --accelerator-type="$ACCELERATOR" \
  --runtime-version="$RUNTIME_VERSION" \
  "${LOC_FLAGS[@]}" \
  "${tier_flags[@]}" \
  "${EXTRA_ARGS[@]}"

if is_true "${NO_WAIT:-0}" NO_WAIT; then
  info "queued; check with tpu/status.sh"
  exit 0
fi

describe=(compute tpus queued-resources describe "$TPU_NAME" "${LOC_FLAGS[@]}"
  "--format=value(state.state)")
if dry_run; then
  run_gcloud "${describe[@]}"
  info "dry run: would poll the command above every ${POLL_INTERVAL}s until ACTIVE"
  exit 0
fi

start=$SECONDS
previous=""
failures=0
while true; do
  if state=$(GCLOUD_QUIET=1 run_gcloud "${describe[@]}"); then
    failures=0
  else
    failures=$((failures + 1))
    ((failures < 5)) || die "could not describe queued resource '$TPU_NAME' 5 times in a row"
    state="(describe failed)"
  fi
  if [[ $state != "$previous" ]]; then
    info "$(date -u +%H:%M:%S) queued resource $TPU_NAME: $state"
    previous=$state
  fi
  case $state in
    ACTIVE)
      info "ready. Next: tpu/setup.sh"
      exit 0
      ;;
    FAILED | SUSPENDING | SUSPENDED)
      die "queued resource '$TPU_NAME' is $state; see tpu/status.sh, then tpu/delete.sh"
      ;;
  esac
  if ((WAIT_TIMEOUT > 0 && SECONDS - start >= WAIT_TIMEOUT)); then
    die "still $state after ${WAIT_TIMEOUT}s; the request stays queued (tpu/status.sh)"
  fi
  sleep "$POLL_INTERVAL"
done
