# shellcheck shell=bash
# Shared settings loading and helpers for the tpu/*.sh scripts. Sourced, never run.
#
# Settings come from the environment first, then from one env file (tpu/tpu.env by default,
# or the file named by TPU_ENV_FILE). The file is parsed, not sourced: KEY=VALUE lines only,
# no command substitution or expansion, so a settings file can never run code.
# shellcheck disable=SC2034  # variables set here are read by the scripts that source this file
# shellcheck disable=SC2016  # single-quoted $HOME/$ID/... are meant to expand on the workers

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "tpu scripts need bash >= 4.4 (found $BASH_VERSION; on macOS: brew install bash)" >&2
  exit 1
fi

# Remote session and paths shared by run.sh / stop.sh / status.sh / logs.sh.
readonly TMUX_SESSION="meljax"
readonly REMOTE_LOGS="meljax-logs"
readonly REMOTE_TARBALL="meljax-src.tar.gz"
readonly REMOTE_MODELS="models"
readonly METADATA_WORKER_URL="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"

# Keys an env file may set. YES is left out on purpose: skipping a delete confirmation must be
# a deliberate choice on the command line, not a line forgotten in a file.
readonly SETTINGS_KEYS=(
  TPU_NAME PROJECT ZONE ACCELERATOR RUNTIME_VERSION
  SPOT RESERVED BEST_EFFORT NO_WAIT POLL_INTERVAL WAIT_TIMEOUT
  GIT_URL GIT_REF WORKDIR REMOTE_DIR REMOTE_VENV PIP_EXTRA_ARGS SSH_FLAGS
  WORKER GCLOUD DRY_RUN
)

SCRIPT_NAME="tpu/$(basename "$0")"

die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

# Wrong command-line usage: exit 2, like most CLI tools.
usage_error() {
  printf '%s: error: %s (see --help)\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

info() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

# is_true VALUE NAME: 1/true/yes/on -> 0, 0/false/no/off/empty -> 1, anything else dies.
is_true() {
  local value=${1,,} name=$2
  case $value in
    1 | true | yes | on) return 0 ;;
    0 | false | no | off | "") return 1 ;;
    *) die "$name must be 0 or 1 (got '$1')" ;;
  esac
}

# POSIX shell quoting: leaves safe words bare, else wraps in single quotes ('\'' for ').
shell_quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# quote_args ARG...: one line, each argument shell-quoted, separated by spaces.
quote_args() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(shell_quote "$arg")"
  done
  printf '%s' "$out"
}

dry_run() {
  is_true "${DRY_RUN:-0}" DRY_RUN
}

# Every gcloud call goes through here. DRY_RUN=1 prints '+ gcloud ...' (one line, shell-quoted)
# on stdout instead of running it; otherwise the command is echoed on stderr (unless
# GCLOUD_QUIET=1, used by polling loops) and run.
run_gcloud() {
  local gcloud_bin=${GCLOUD:-gcloud}
  if dry_run; then
    printf '+ %s\n' "$(quote_args "$gcloud_bin" "$@")"
    return 0
  fi
  if ! command -v "$gcloud_bin" >/dev/null 2>&1; then
    die "'$gcloud_bin' not found: install the Google Cloud CLI (https://cloud.google.com/sdk)"
  fi
  if [[ ${GCLOUD_QUIET:-0} != 1 ]]; then
    printf '+ %s\n' "$(quote_args "$gcloud_bin" "$@")" >&2
  fi
  "$gcloud_bin" "$@"
}

_is_settings_key() {
  local key=$1 known
  for known in "${SETTINGS_KEYS[@]}"; do
    [[ $key == "$known" ]] && return 0
  done
  return 1
}

# load_env_file FILE: set each KEY=VALUE of FILE that the environment does not already set.
load_env_file() {
  local file=$1 line key value lineno=0
  while IFS= read -r line || [[ -n $line ]]; do
    lineno=$((lineno + 1))
    line=${line%$'\r'}
    # Trim leading/trailing blanks.
    line=${line#"${line%%[![:space:]]*}"}
    line=${line%"${line##*[![:space:]]}"}
    [[ -z $line || $line == \#* ]] && continue
    line=${line#export }
    if [[ ! $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]]; then
      die "$file:$lineno: expected KEY=VALUE, got: $line"
    fi
    key=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    if ! _is_settings_key "$key"; then
      die "$file:$lineno: unknown setting '$key' (known: ${SETTINGS_KEYS[*]})"
    fi
    # Quoted values keep everything inside the quotes; otherwise ' #...' starts a comment.
    if [[ $value =~ ^\"([^\"]*)\"[[:space:]]*(#.*)?$ || $value =~ ^\'([^\']*)\'[[:space:]]*(#.*)?$ ]]; then
      value=${BASH_REMATCH[1]}
    elif [[ $value =~ ^([^[:space:]]*)[[:space:]]+#.*$ || $value =~ ^([^[:space:]]*)[[:space:]]*$ ]]; then
      value=${BASH_REMATCH[1]}
    else
      die "$file:$lineno: quote values that contain spaces: $key=\"...\""
    fi
    # The environment wins over the file.
    if [[ ! -v $key ]]; then
      printf -v "$key" '%s' "$value"
      export "${key?}"
    fi
  done <"$file"
}

# load_settings: read the env file, fill defaults, resolve PROJECT. Call after --help handling.
load_settings() {
  local env_file
  if [[ -n ${TPU_ENV_FILE:-} ]]; then
    [[ -f $TPU_ENV_FILE || $TPU_ENV_FILE == /dev/null ]] ||
      die "TPU_ENV_FILE=$TPU_ENV_FILE does not exist"
    env_file=$TPU_ENV_FILE
  else
    env_file="$TPU_DIR/tpu.env"
  fi
  if [[ -f $env_file ]]; then
    load_env_file "$env_file"
  fi
  dry_run || true # validates DRY_RUN early
  GIT_REF=${GIT_REF:-HEAD}
  REMOTE_DIR=${REMOTE_DIR:-meljax}
  REMOTE_VENV=${REMOTE_VENV:-meljax-venv}
  POLL_INTERVAL=${POLL_INTERVAL:-30}
  WAIT_TIMEOUT=${WAIT_TIMEOUT:-0}
  SSH_EXTRA=()
  if [[ -n ${SSH_FLAGS:-} ]]; then
    read -r -a SSH_EXTRA <<<"$SSH_FLAGS"
  fi
}

# require VAR...: die naming every unset/empty one.
require() {
  local missing=() var
  for var in "$@"; do
    [[ -n ${!var:-} ]] || missing+=("$var")
  done
  if ((${#missing[@]})); then
    local names
    names=$(printf '%s, ' "${missing[@]}")
    die "missing required setting(s): ${names%, }. Export them or put them in tpu/tpu.env" \
      "(copy tpu/tpu.env.example)."
  fi
}

# resolve_location: validate TPU_NAME/ZONE, resolve PROJECT, build LOC_FLAGS.
resolve_location() {
  require TPU_NAME ZONE
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "TPU_NAME='$TPU_NAME' is not a valid name (lowercase letters, digits, '-'; starts with a letter)"
  if [[ -z ${PROJECT:-} ]]; then
    if dry_run; then
      PROJECT="PROJECT_ID"
      info "PROJECT not set; dry run uses the placeholder '$PROJECT'"
    else
      PROJECT=$(GCLOUD_QUIET=1 run_gcloud config get-value project 2>/dev/null || true)
      [[ -n $PROJECT && $PROJECT != "(unset)" ]] ||
        die "PROJECT not set and 'gcloud config get-value project' gave none; set PROJECT"
    fi
  fi
  LOC_FLAGS=("--zone=$ZONE" "--project=$PROJECT")
}

# default_runtime_version ACCELERATOR: TPU software version recommended for JAX on that family
# (https://cloud.google.com/tpu/docs/runtimes).
default_runtime_version() {
  local accel=$1
  case ${accel%%-*} in
    v6e) printf 'v2-alpha-tpuv6e' ;;
    v5p) printf 'v2-alpha-tpuv5' ;;
    v5litepod | v5e) printf 'v2-alpha-tpuv5-lite' ;;
    v4 | v3 | v2) printf 'tpu-ubuntu2204-base' ;;
    *) return 1 ;;
  esac
}

# remote_path PATH: shell text for PATH on a worker; relative paths are under the remote $HOME.
remote_path() {
  local p=$1
  if [[ $p == /* ]]; then
    shell_quote "$p"
  else
    p=${p#\~/}
    printf '"$HOME"/%s' "$(shell_quote "$p")"
  fi
}

# display_path PATH: how a remote path reads for humans (~/x for paths under $HOME).
display_path() {
  # shellcheck disable=SC2088  # a literal '~' is the point: this text is for humans
  if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '~/%s' "${1#\~/}"; fi
}

# check_remote_dir NAME VALUE: refuse paths that would make 'rm -rf' or 'cd' dangerous.
check_remote_dir() {
  local name=$1 value=$2
  [[ $value =~ ^~?[A-Za-z0-9._/-]+$ ]] ||
    die "$name='$value' may only contain letters, digits, '.', '_', '-', '/'"
  [[ /$value/ != */../* && /$value/ != */./* ]] || die "$name='$value' must not contain '.' or '..'"
  local trimmed=${value#\~/}
  trimmed=${trimmed%/}
  [[ -n $trimmed && $trimmed != "~" && $trimmed != "/" ]] || die "$name='$value' is too broad"
  if [[ $trimmed == /* ]]; then
    local rest=${trimmed#/}
    [[ $rest == */* ]] || die "$name='$value': an absolute path needs at least two levels"
  fi
}

# check_worker VALUE: 'all' or a comma-separated list of worker numbers.
check_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+(,[0-9]+)*$ ]] ||
    die "WORKER='$1' must be 'all' or worker numbers like 0 or 0,3"
}

# check_run_name VALUE: used in paths and messages on the workers.
check_run_name() {
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ && $1 != latest ]] ||
    die "run name '$1' must be letters, digits, '_' or '-' (and not 'latest')"
}

# ssh_workers WORKER COMMAND: run one shell command line on the given TPU workers.
ssh_workers() {
  local worker=$1 command=$2
  run_gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker="$worker" "${LOC_FLAGS[@]}" \
    "${SSH_EXTRA[@]}" --command="$command"
}

# Shell text (remote side) that sets ID to this worker's number: metadata server first,
# the hostname's '-w-N' suffix otherwise.
remote_worker_id_snippet() {
  printf '%s' "ID=\$(curl -sf -m 5 -H Metadata-Flavor:Google $METADATA_WORKER_URL || true); "
  printf '%s' 'H=$(hostname); ID=${ID:-${H##*-w-}}'
}

# print_settings_help: the settings block shared by every --help.
print_settings_help() {
  cat <<'EOF'
Settings (environment variables, or KEY=VALUE lines in tpu/tpu.env; the environment wins;
TPU_ENV_FILE=PATH picks another file):
  TPU_NAME        queued-resource and node name (required)
  ZONE            e.g. us-east5-a (required)
  PROJECT         GCP project (default: gcloud config get-value project)
  DRY_RUN=1       print the gcloud commands ('+ gcloud ...') instead of running them
  SSH_FLAGS       extra flags for tpu-vm ssh/scp, e.g. --tunnel-through-iap
  GCLOUD          gcloud binary (default: gcloud)
EOF
}
