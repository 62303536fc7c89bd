# RLHF with PPO: the SFT model is the policy's start and the reference, the reward model (config/reward_tasks.py)
# scores its rollouts, and a KL penalty keeps it where the reward model is right. No baseline: only the replies the
# reward model is fairly sure of are pushed up. The recipe's row (pipeline.py's ppo stage and its two controls;
# --rl_config=config/grpo_tasks.py runs them as GRPO, with a baseline); rl_compare.py's methods build on it.
#   python ppo.py config/ppo_tasks.py                                                   # the recipe
#   python ppo.py config/ppo_tasks.py --kl_coef=0 --kl_target=0 --out_dir=out-ppo-nokl  # no KL penalty
#   python plots.py --compare=out-ppo,out-ppo-nokl                                      # table and plot
init_from = 'out-sft'
reward_model = 'out-reward'
out_dir = 'out-ppo'
reward = 'model'
prompts = 'tasks'

temperature = 0.7         # nearer the greedy replies that are evaluated
critic = False            # no baseline, nothing pushed down: a critic gained no more (docs/rl_compare.md)
whiten_advantages = False
push_down = False
score_margin = 0.5        # reward only replies the reward model is fairly sure of (z > 0.5)

batch_size = 256          # a reward this noisy needs the bigger batch: 128 / 32 gained far less
minibatch_size = 64
ppo_epochs = 2
max_new_tokens = 16
kl_coef = 0.1             # a penalty that matters: on count and add the reward model's scores are noise
kl_target = 0.1           # chosen on val: targets 0.1 / 0.2 / 0.4 / 1 gave 49.6 / 47.8 / 48.1 / 48.1% at KL 0.15 / 0.18 (x3)
kl_horizon = 10000        # a slow controller

lora_rank = 8
lora_alpha = 16.0
learning_rate = 5e-4
max_iters = 50            # so that the recipe fits 15 minutes on 2 cores (100 cost 85 s more)

eval_interval = 25
eval_tasks = 250
