#!/usr/bin/env bash
# OpenRLHF PPO / REINFORCE++ / GRPO with the reward service as a remote reward model. OpenRLHF posts
# {"query": [prompt + response, ...], ...} to the URL and reads the rewards back; the service's /get_reward route
# speaks that protocol (a query that starts with the policy's bos gets no second one). Add your usual
# actor/critic/data arguments.
set -euo pipefail
RM_URL=${RM_URL:-http://127.0.0.1:8000}

# OpenRLHF releases with the flat command line:
python3 -m openrlhf.cli.train_ppo_ray \
    --pretrain "${POLICY:-Qwen/Qwen2.5-0.5B-Instruct}" \
    --remote_rm_url "$RM_URL/get_reward" \
    "$@"

# Releases with grouped options name the same setting --reward.remote_url:
#   python3 -m openrlhf.cli.train_ppo_ray --reward.remote_url "$RM_URL/get_reward" ...
