# A reward model on pairs of the SFT model's own replies, labelled by the task checkers:
#   python prepare.py prefs --sft_dir=out-sft
#   python reward.py config/reward_tasks.py
# The checkpoint with the lowest held-out loss is kept; it ends with best-of-n on val prompts, the reference
# curve of the over-optimization plot.
init_from = 'out-sft'
out_dir = 'out-reward'
data = 'prefs'
lora_rank = 0         # full fine-tuning: at 128 wide a step is faster than LoRA's and learns more per step
batch_size = 32
max_iters = 1000
learning_rate = 5e-4
warmup_iters = 20
min_lr = 5e-5
center_coef = 0.01    # keeps a right and a wrong reply's midpoint near 0: a positive score means "probably right"
eval_interval = 250
eval_pairs = 1000
rank_prompts = 200    # best-of-n, sampled as PPO samples
rank_samples = 64
rank_temperature = 0.7
rank_split = 'val'
log_interval = 50
