# A reward model on the task suite's preference pairs: the supervised model's own replies, gold-labelled
#   python prepare.py prefs --sft_dir=out-sft
#   python reward.py config/reward_tasks.py
#   python reward.py config/reward_tasks.py --lora_rank=8 --learning_rate=1e-3 --min_lr=1e-4 --max_iters=1500 \
#       --out_dir=out-reward-lora      # the LoRA reward model of the earlier cards
# Centred (center_coef): the pair loss leaves each prompt's scores free to sit anywhere; centring keeps the
# midpoint of a right and a wrong reply near 0, so that a positive score means "probably right" on any prompt,
# which PPO without a baseline relies on (config/ppo_tasks.py). The model with the lowest held-out loss is kept.
# Full fine-tuning, not LoRA: at 4 layers x 128 the two thin rank-8 matmuls LoRA adds to each layer cost more
# than the weight gradients they save (a step is ~1.25x faster without them), and the full model learns faster
# per step: 1,000 full iterations reached val loss 0.259-0.272 and 85-87% of held-out pairs, LoRA r=8 0.288
# (85.2%) after 1,000 and 0.267 (86.1%) after 1,500 (README, "Fitting 15 minutes").
init_from = 'out-sft'
out_dir = 'out-reward'
data = 'prefs'
lora_rank = 0
batch_size = 32
max_iters = 1000
learning_rate = 5e-4
warmup_iters = 20
min_lr = 5e-5
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
