# A reward model on the task suite's preference pairs: the supervised model's own replies, gold-labelled
#   python prepare.py prefs --sft_dir=out-sft
#   python reward.py config/reward_tasks.py
#   python reward.py config/reward_tasks.py --lora_rank=0 --learning_rate=3e-4 --out_dir=out-reward-full
# Centred (center_coef): the pair loss leaves each prompt's scores free to sit anywhere; centring keeps the
# midpoint of a right and a wrong reply near 0, so that a positive score means "probably right" on any prompt,
# which PPO without a baseline relies on (config/ppo_tasks.py). The model with the lowest held-out loss is kept.
init_from = 'out-sft'
out_dir = 'out-reward'
data = 'prefs'
lora_rank = 8
lora_alpha = 16.0
batch_size = 32
max_iters = 1500
learning_rate = 1e-3
warmup_iters = 20
min_lr = 1e-4
center_coef = 0.01
eval_interval = 250
eval_pairs = 1000
# best-of-n on held-out prompts, sampled as PPO samples (config/ppo_tasks.py's temperature): the reference
# curve of the over-optimization plot
rank_prompts = 200
rank_samples = 64
rank_temperature = 0.7
rank_split = 'val'
log_interval = 50
