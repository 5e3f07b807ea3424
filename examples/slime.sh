#!/usr/bin/env bash
# slime with the reward service as its remote reward model: slime posts each sample to --rm-url and reads the
# reward from the --reward-key field of the answer (the service's /reward route). Add your usual model, rollout
# and training arguments.
set -euo pipefail
RM_URL=${RM_URL:-http://127.0.0.1:8000}

python3 train.py \
    --rm-type remote_rm \
    --rm-url "$RM_URL/reward" \
    --reward-key reward \
    "$@"
