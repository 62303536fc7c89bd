# RLHF with PPO on the task suite: the supervised model (config/sft_tasks.py) is the policy's start and the
# reference; the reward model (config/reward_tasks.py) was trained on gold-labelled pairs of its replies.
#   python ppo.py config/ppo_tasks.py                                              # KL penalty, adaptive beta
#   python ppo.py config/ppo_tasks.py --kl_coef=0 --kl_target=0 --out_dir=out-ppo-beta0   # no penalty
#   python ppo.py config/ppo_tasks.py --reward=gold --out_dir=out-ppo-gold         # the checker as reward
#   python ppo.py --compare=out-ppo,out-ppo-beta0                                  # table (+ plot)
init_from = 'out-sft'
reward_model = 'out-reward'
out_dir = 'out-ppo'
reward = 'model'
prompts = 'tasks'

batch_size = 64
max_new_tokens = 16
kl_coef = 0.05
kl_target = 1.0
kl_horizon = 500

ppo_epochs = 4
minibatch_size = 16
lora_rank = 8
lora_alpha = 16.0
learning_rate = 3e-4
value_learning_rate = 1e-4
max_iters = 100

eval_interval = 25
eval_tasks = 250
