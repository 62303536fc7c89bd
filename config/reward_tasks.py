# A reward model on the task suite's preference pairs: the supervised model's own replies, gold-labelled
#   python prepare.py prefs --sft_dir=out-sft
#   python reward.py config/reward_tasks.py
#   python reward.py config/reward_tasks.py --lora_rank=0 --learning_rate=3e-4 --out_dir=out-reward-full
init_from = 'out-sft'
out_dir = 'out-reward'
data = 'prefs'
lora_rank = 8
lora_alpha = 16.0
batch_size = 32
max_iters = 300
learning_rate = 1e-3
warmup_iters = 20
min_lr = 1e-4
eval_interval = 100
eval_pairs = 1000
rank_prompts = 250
rank_samples = 8
rank_split = 'test'
log_interval = 20
