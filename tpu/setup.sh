#!/usr/bin/env bash
# Put the meljax code on every TPU worker and install it into a venv there.
# shellcheck disable=SC2016  # single-quoted $HOME/$PY/... are meant to expand on the workers
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$TPU_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu/setup.sh [--local [--src DIR] | --git] [--no-install] [--weights PATH]...

On every worker of the slice (--worker=all):
  1. code: either a tarball of a local checkout, copied with 'tpu-vm scp' (default when
     GIT_URL is empty), or 'git clone' of GIT_URL at GIT_REF (default when GIT_URL is set).
     The local tarball holds the files git sees (tracked + untracked, not ignored), so
     uncommitted edits travel; REMOTE_DIR is replaced by it.
  2. a venv (REMOTE_VENV, Python >= 3.11, installed with apt if the image lacks it) and
     'pip install -e ".[tpu]"' in REMOTE_DIR.
  3. optional model weights (--weights): a local Hugging Face folder is copied with scp,
     a gs:// folder is synced by each worker; both land in ~/models/BASENAME.

Options:
  --local         copy a local checkout (default when GIT_URL is empty)
  --src DIR       local checkout to copy (default: the repository holding tpu/)
  --git           clone GIT_URL at GIT_REF on the workers
  --no-install    only sync code / weights, skip the venv and pip install
  --weights PATH  local folder or gs://bucket/folder with model weights (repeatable)
  -h, --help      show this help

Settings for this script:
  GIT_URL         repository URL to clone on the workers (they need read access to it)
  GIT_REF         branch, tag or commit (default: HEAD of the remote)
  REMOTE_DIR      code folder on the workers (default: meljax, i.e. ~/meljax)
  REMOTE_VENV     venv folder on the workers (default: meljax-venv, i.e. ~/meljax-venv)
  PIP_EXTRA_ARGS  extra words for 'pip install', e.g. --no-cache-dir
EOF
  print_settings_help
}

MODE=""
SRC_DIR="$(dirname "$TPU_DIR")"
INSTALL=1
WEIGHTS=()
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --local) MODE=local ;;
    --git) MODE=git ;;
    --src)
      (($# >= 2)) || usage_error "--src needs a directory"
      SRC_DIR=$2
      shift
      ;;
    --src=*) SRC_DIR=${1#--src=} ;;
    --no-install) INSTALL=0 ;;
    --weights)
      (($# >= 2)) || usage_error "--weights needs a path"
      WEIGHTS+=("$2")
      shift
      ;;
    --weights=*) WEIGHTS+=("${1#--weights=}") ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done

load_settings
resolve_location
check_remote_dir REMOTE_DIR "$REMOTE_DIR"
check_remote_dir REMOTE_VENV "$REMOTE_VENV"
if [[ -z $MODE ]]; then
  if [[ -n ${GIT_URL:-} ]]; then MODE=git; else MODE=local; fi
fi
if [[ $MODE == git ]]; then
  require GIT_URL
fi

RDIR=$(remote_path "$REMOTE_DIR")
RVENV=$(remote_path "$REMOTE_VENV")
SHOWDIR=$(display_path "$REMOTE_DIR")

join_statements() {
  local IFS=$'\x1f' joined
  joined="$*"
  printf '%s' "${joined//$'\x1f'/; }"
}

# pack_checkout SRC OUT: gzip tarball of what git sees in SRC (tracked + untracked, not ignored).
pack_checkout() {
  local src=$1 out=$2 list
  if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    list="$out.files"
    git -C "$src" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        # Tracked files deleted in the working tree are still listed; tar would fail on them.
        if [[ -e $src/$f ]]; then printf '%s\0' "$f"; fi
      done >"$list"
    tar -czf "$out" -C "$src" --null -T "$list"
  else
    tar -czf "$out" -C "$src" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache .
  fi
}

sync_local_code() {
  [[ -f $SRC_DIR/pyproject.toml ]] ||
    die "--src '$SRC_DIR' has no pyproject.toml; point it at a meljax checkout"
  local tarball
  if dry_run; then
    tarball="/tmp/meljax-setup/$REMOTE_TARBALL"
    info "dry run: would pack $SRC_DIR (git-visible files) into $tarball"
  else
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064  # expand tmp now: it is local to this function
    trap "rm -rf '$tmp'" EXIT
    tarball="$tmp/$REMOTE_TARBALL"
    pack_checkout "$SRC_DIR" "$tarball"
    info "packed $SRC_DIR: $(du -h "$tarball" | cut -f1)"
  fi
  run_gcloud compute tpus tpu-vm scp --recurse --worker=all "${LOC_FLAGS[@]}" "${SSH_EXTRA[@]}" \
    "$tarball" "$TPU_NAME:$REMOTE_TARBALL"
  ssh_workers all "$(join_statements \
    'set -e' \
    "rm -rf $RDIR" \
    "mkdir -p $RDIR" \
    "tar -xzf \"\$HOME\"/$REMOTE_TARBALL -C $RDIR" \
    "rm -f \"\$HOME\"/$REMOTE_TARBALL" \
    "echo \"\$(hostname): code unpacked in $SHOWDIR\"")"
}

sync_git_code() {
  local url ref
  url=$(shell_quote "$GIT_URL")
  ref=$(shell_quote "$GIT_REF")
  ssh_workers all "$(join_statements \
    'set -e' \
    "if [ -e $RDIR ] && [ ! -d $RDIR/.git ]; then mv $RDIR $RDIR.old-\$(date +%s); fi" \
    "if [ ! -d $RDIR/.git ]; then git clone --quiet $url $RDIR; fi" \
    "git -C $RDIR remote set-url origin $url" \
    "git -C $RDIR fetch --quiet --force origin $ref" \
    "git -C $RDIR checkout --quiet --force --detach FETCH_HEAD" \
    "echo \"\$(hostname): $SHOWDIR at \$(git -C $RDIR rev-parse --short HEAD)\"")"
}

install_venv() {
  local pip_extra=() extra=""
  if [[ -n ${PIP_EXTRA_ARGS:-} ]]; then
    read -r -a pip_extra <<<"$PIP_EXTRA_ARGS"
    extra=" $(quote_args "${pip_extra[@]}")"
  fi
  local apt='sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq'
  ssh_workers all "$(join_statements \
    'set -e' \
    'PY=""' \
    'for c in python3.13 python3.12 python3.11 python3; do if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then PY=$c; break; fi; done' \
    "if [ -z \"\$PY\" ]; then sudo apt-get update -qq; $apt python3.11 python3.11-venv; PY=python3.11; fi" \
    "if [ ! -x $RVENV/bin/python ]; then \"\$PY\" -m venv $RVENV || { sudo apt-get update -qq; $apt \"\$PY-venv\"; rm -rf $RVENV; \"\$PY\" -m venv $RVENV; }; fi" \
    "$RVENV/bin/python -m pip install --quiet --upgrade pip" \
    "cd $RDIR" \
    "$RVENV/bin/python -m pip install --quiet -e \".[tpu]\"$extra" \
    "echo \"\$(hostname): installed, jax \$($RVENV/bin/python -c 'import jax; print(jax.__version__)')\"")"
}

sync_weights() {
  local path=$1 name
  name=$(basename "${path%/}")
  [[ $name =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ && $name != gs: ]] ||
    die "--weights '$path': the folder name '$name' must be letters, digits, '.', '_', '-'"
  local dest
  dest=$(remote_path "$REMOTE_MODELS/$name")
  if [[ $path == gs://* ]]; then
    ssh_workers all "$(join_statements \
      'set -e' \
      "mkdir -p $dest" \
      "gcloud storage rsync --recursive $(shell_quote "${path%/}") $dest" \
      "echo \"\$(hostname): weights in ~/$REMOTE_MODELS/$name\"")"
  else
    [[ -d $path ]] || die "--weights '$path' is neither a local folder nor gs://..."
    ssh_workers all "mkdir -p $(remote_path "$REMOTE_MODELS") && rm -rf $dest"
    run_gcloud compute tpus tpu-vm scp --recurse --worker=all "${LOC_FLAGS[@]}" \
      "${SSH_EXTRA[@]}" "${path%/}" "$TPU_NAME:$REMOTE_MODELS/"
  fi
  info "weights '$path' -> ~/$REMOTE_MODELS/$name on every worker"
}

if [[ $MODE == git ]]; then
  info "cloning $GIT_URL @ $GIT_REF into $SHOWDIR on every worker of $TPU_NAME"
  sync_git_code
else
  info "copying $SRC_DIR to $SHOWDIR on every worker of $TPU_NAME"
  sync_local_code
fi
if ((INSTALL)); then
  install_venv
fi
for w in "${WEIGHTS[@]}"; do
  sync_weights "$w"
done
info "done. Next: tpu/run.sh meljax train --config=configs/... --workdir=gs://..."
