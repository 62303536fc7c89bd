# PPO with the task suite's checker as the reward (1 if the reply is correct, else 0) and no critic: the
# setting that raised held-out gold accuracy above the supervised model's on CPU (README, PPO section).
# With no value model and unwhitened advantages, every token of a correct reply gets advantage 1 (plus the
# KL penalties ahead of it) and a wrong reply gets only its KL penalties: correct replies are pushed up,
# wrong ones are not pushed down. On this 1M-parameter model any baseline (a critic, whitening, or a
# leave-one-out group mean) made most updates push wrong samples down, and greedy accuracy fell.
# Rollouts at temperature 0.7, as config/ppo_tasks.py samples: the two runs differ in their reward.
#   python ppo.py config/ppo_tasks_gold.py
init_from = 'out-sft'
out_dir = 'out-ppo-gold'
reward = 'gold'
prompts = 'tasks'
temperature = 0.7

critic = False
whiten_advantages = False

batch_size = 128
minibatch_size = 32
ppo_epochs = 2
max_new_tokens = 16
kl_coef = 0.05
kl_target = 1.0
kl_horizon = 500

lora_rank = 8
lora_alpha = 16.0
learning_rate = 5e-4
max_iters = 100

eval_interval = 50
eval_tasks = 250
