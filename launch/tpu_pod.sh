#!/usr/bin/env bash
# Runs one qponder command on every worker of a Cloud TPU VM pod slice, with one log file per worker.
#
# Usage: launch/tpu_pod.sh [--dry_run] <step> [-- command ...]
#   create    create the TPU VM slice (skipped when it exists)
#   sync      copy this checkout (git-tracked and untracked-not-ignored files) to $REMOTE_DIR on every worker
#   install   pip install the package and jax[tpu] on every worker
#   run       run the command after -- on every worker at once (QPONDER_DISTRIBUTED=tpu: the processes find each
#             other through the TPU metadata); worker i's output goes to $LOG_DIR/worker_i.log
#   all       create, sync, install, run
#   delete    delete the slice
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v5p-32), RUNTIME_VERSION, PROJECT (optional),
#   SPOT=1 (spot VMs), REMOTE_DIR (~/qponder_jax), LOG_DIR (runs/tpu_logs/$TPU_NAME), NUM_WORKERS (default: asked
#   from gcloud), JAX_SPEC (jax[tpu] pip spec), DRY_RUN=1 (same as --dry_run: print the exact commands, run nothing).
# Example:
#   TPU_NAME=qp ZONE=us-east5-a ACCELERATOR_TYPE=v5p-32 launch/tpu_pod.sh all -- \
#     python3 -m qponder_jax.main --config=configs/qponder.py:7b --workdir=gs://bucket/runs/qponder_7b
# The workdir must be shared by all workers (a gs:// bucket or a shared file system): orbax writes checkpoints from
# every worker; only worker 0 writes metrics, TensorBoard events and the HF export.
# Exit status of `run`: 0 when every worker finished, 75 when they stopped early (preempted after saving, or a peer
# never joined; rerun the same command to resume), 1 when a worker failed otherwise.
set -euo pipefail

TPU_NAME="${TPU_NAME:-qponder}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"
SPOT="${SPOT:-0}"
REMOTE_DIR="${REMOTE_DIR:-~/qponder_jax}"
LOG_DIR="${LOG_DIR:-runs/tpu_logs/${TPU_NAME}}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]==0.10.2}"
DRY_RUN="${DRY_RUN:-0}"
EXIT_RESUME=75  # qponder's exit status for "stopped early, rerun to resume" (qponder_jax.errors.EXIT_RESUME)
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

# Prints a command (shell-quoted); runs it unless dry.
run_cmd() {
  local arg line="+"
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
      line+=" ${arg}"
    else
      line+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  echo "${line}"
  if [[ "${DRY_RUN}" != "1" ]]; then "$@"; fi
}

gcloud_tpu() {
  local args=(gcloud compute tpus tpu-vm "$@" --zone="${ZONE}")
  if [[ -n "${PROJECT}" ]]; then args+=(--project="${PROJECT}"); fi
  run_cmd "${args[@]}"
}

num_workers() {
  if [[ -n "${NUM_WORKERS:-}" ]]; then echo "${NUM_WORKERS}"; return; fi
  if [[ "${DRY_RUN}" == "1" ]]; then echo 2; return; fi  # a stand-in so the dry run can show per-worker commands
  local project_args=()
  if [[ -n "${PROJECT}" ]]; then project_args=(--project="${PROJECT}"); fi
  gcloud compute tpus tpu-vm describe "${TPU_NAME}" --zone="${ZONE}" "${project_args[@]}" \
    --format='value(networkEndpoints[].ipAddress)' | tr ';,' '  ' | wc -w
}

step_create() {
  if [[ "${DRY_RUN}" != "1" ]] && gcloud compute tpus tpu-vm describe "${TPU_NAME}" --zone="${ZONE}" \
      ${PROJECT:+--project="${PROJECT}"} >/dev/null 2>&1; then
    echo "TPU ${TPU_NAME} exists in ${ZONE}; using it"
    return
  fi
  local extra=()
  if [[ "${SPOT}" == "1" ]]; then extra+=(--spot); fi
  gcloud_tpu create "${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" \
    "${extra[@]}"
}

step_sync() {
  local tarball="/tmp/qponder_jax_${TPU_NAME}.tar.gz"
  run_cmd bash -c "cd '${REPO_ROOT}' && git ls-files -co --exclude-standard -z | tar --null -czf '${tarball}' -T -"
  gcloud_tpu scp "${tarball}" "${TPU_NAME}:/tmp/qponder_jax.tar.gz" --worker=all
  gcloud_tpu ssh "${TPU_NAME}" --worker=all \
    --command="mkdir -p ${REMOTE_DIR} && tar -xzf /tmp/qponder_jax.tar.gz -C ${REMOTE_DIR}"
}

step_install() {
  gcloud_tpu ssh "${TPU_NAME}" --worker=all \
    --command="cd ${REMOTE_DIR} && python3 -m pip install -q -e . '${JAX_SPEC}'"
}

step_run() {
  if [[ $# -eq 0 ]]; then
    echo "tpu_pod.sh run: give the command after --" >&2
    exit 2
  fi
  local quoted n i status=0
  quoted="$(printf ' %q' "$@")"
  n="$(num_workers)"
  run_cmd mkdir -p "${LOG_DIR}"
  local pids=()
  for ((i = 0; i < n; i++)); do
    echo "worker ${i} -> ${LOG_DIR}/worker_${i}.log"
    if [[ "${DRY_RUN}" == "1" ]]; then
      gcloud_tpu ssh "${TPU_NAME}" --worker="${i}" --command="cd ${REMOTE_DIR} && QPONDER_DISTRIBUTED=tpu${quoted}"
    else
      gcloud_tpu ssh "${TPU_NAME}" --worker="${i}" \
        --command="cd ${REMOTE_DIR} && QPONDER_DISTRIBUTED=tpu${quoted}" >"${LOG_DIR}/worker_${i}.log" 2>&1 &
      pids+=("$!")
    fi
  done
  local code preempted=0
  for i in "${!pids[@]}"; do
    code=0
    wait "${pids[${i}]}" || code=$?
    if [[ "${code}" == "${EXIT_RESUME}" ]]; then
      echo "worker ${i} stopped early (exit ${code}: preempted or a peer missing); see ${LOG_DIR}/worker_${i}.log" >&2
      preempted=1
    elif [[ "${code}" != 0 ]]; then
      echo "worker ${i} failed (exit ${code}); see ${LOG_DIR}/worker_${i}.log" >&2
      status=1
    fi
  done
  if [[ "${status}" == 0 && "${preempted}" == 1 ]]; then
    echo "the run stopped early: rerun the same command to resume from its last checkpoint" >&2
    status="${EXIT_RESUME}"
  fi
  return "${status}"
}

main() {
  if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
  local step="${1:-}"
  if [[ -z "${step}" || "${step}" == "-h" || "${step}" == "--help" ]]; then usage; exit 0; fi
  shift
  if [[ "${1:-}" == "--" ]]; then shift; fi
  case "${step}" in
    create) step_create ;;
    sync) step_sync ;;
    install) step_install ;;
    run) step_run "$@" ;;
    all) step_create; step_sync; step_install; step_run "$@" ;;
    delete) gcloud_tpu delete "${TPU_NAME}" --quiet ;;
    *) echo "tpu_pod.sh: unknown step ${step}" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
