#!/usr/bin/env bash
# verl GRPO with the reward service as the reward. Assumes a verl installation and a dataset whose extra_info
# carries the prompt (see examples/README.md); RM_URL is where `reward-serve` listens.
set -euo pipefail
RM_URL=${RM_URL:-http://127.0.0.1:8000}
REWARD_FILE=$(python -c "import service.verl; print(service.verl.__file__)")

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    data.train_files="${TRAIN_FILES:?set TRAIN_FILES to your parquet}" \
    data.val_files="${VAL_FILES:-$TRAIN_FILES}" \
    actor_rollout_ref.model.path="${POLICY:-Qwen/Qwen2.5-0.5B-Instruct}" \
    actor_rollout_ref.rollout.n=4 \
    reward_model.enable=False \
    reward_model.reward_manager=batch \
    custom_reward_function.path="$REWARD_FILE" \
    custom_reward_function.name=compute_score_batch \
    +custom_reward_function.reward_kwargs.reward_service_url="$RM_URL" \
    +custom_reward_function.reward_kwargs.prompt_key=prompt \
    "$@"
