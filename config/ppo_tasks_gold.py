# PPO with the task checker as the reward (1 if the reply is right, else 0): what PPO does when the reward is
# right, next to config/ppo_tasks.py's learned one. Same rollouts (T = 0.7), no critic, nothing pushed down:
# REINFORCE on the right replies (filtered behaviour cloning) with PPO's clipped ratio. 200 iterations: from the
# Xeon recipe's SFT model 54.6% val at 100, 60.7% at 200 (SFT 44.8%; docs/experiments.md, "RL with the checker").
# The recipe's checker row was this until GRPO (config/grpo_tasks_gold.py) became cheap enough to replace it; it
# stays as the comparison rl_compare.py builds on: without a baseline, positive samples alone sharpen greedy replies.
#   python ppo.py config/ppo_tasks_gold.py
init_from = 'out-sft'
out_dir = 'out-ppo-gold'
reward = 'gold'
prompts = 'tasks'
temperature = 0.7

critic = False            # a baseline pushes wrong replies down, whose gradients are long: noise (docs/rl_compare.md)
whiten_advantages = False
push_down = False         # (nothing to push down: no baseline, and a score is 0 or 1)
score_margin = 0.0        # every right reply pushed up

batch_size = 128          # 256 gains more; 128 saves 2 minutes of the recipe
minibatch_size = 32
ppo_epochs = 2
max_new_tokens = 16
kl_coef = 0.05
kl_target = 1.0
kl_horizon = 500

lora_rank = 8
lora_alpha = 16.0
learning_rate = 5e-4
max_iters = 200            # 100: SFT + 9.8 val; 200: + 15.9, 65 s more of the recipe

eval_interval = 100
eval_tasks = 250
