# GRPO (DeepSeekMath's group-relative policy optimization) with the task checker as the reward: the recipe's checker
# row (pipeline.py's ppo_gold stage). 8 replies to each of 128 prompts per batch, each reply scored against its
# group's mean and std, every below-mean reply pushed down, no critic; only the groups whose replies differ train
# (the rest have no advantage), two passes over each batch in minibatches of 256 replies (32 groups), PPO's clipped
# ratio over the reuse; a group's replies run after one copy of their prompt (rl.pack_by_prompt). From the AMD
# EPYC recipe's SFT model (39.9% val, 40.5% test): 55% val, 54% test (SFT + 15 / + 13.5) in 140 s at two threads,
# where config/ppo_tasks_gold.py (no baseline, 200 iterations) gains + 22.0 / + 19.3 in 175 s
# (docs/experiments.md, "RL with the checker: group-relative runs").
#   python ppo.py config/grpo_tasks_gold.py --init_from=out-sft
init_from = 'out-sft'
out_dir = 'out-grpo-gold'
reward = 'gold'
prompts = 'tasks'
temperature = 0.7

critic = False
whiten_advantages = False
group_size = 8            # replies per prompt: 2 or 4 gave a poorer baseline (45-50% val)
group_baseline = 'mean'
group_std = True
push_down = True
group_train = 'spread'    # about half the groups: the same val accuracy as training all (49.7 / 50.7%) at half the cost

batch_size = 1024         # 128 prompts x 8: a minibatch of 16 prompts learns as little as 16 prompts
minibatch_size = 256
ppo_epochs = 2            # at lr 1e-3, 50 iterations: 50.0% val, as 4 passes at 5e-4 (49.7%); 1 pass at 2e-3: 43.2%
max_new_tokens = 16
kl_coef = 0.05            # (with 1,024 rollouts an iteration the controller has beta near 0 within ~10 iterations)
kl_target = 1.0
kl_horizon = 500

lora_rank = 8
lora_alpha = 16.0
learning_rate = 1e-3
max_iters = 100           # val 50.0% at 50 (test 48.4%: SFT + 7.9), 56.3% at 100

eval_interval = 50
eval_tasks = 1000
