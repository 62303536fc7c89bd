# Plain DPO (no NLL term) of the SFT model on pairs of its own replies, labelled by the task checkers:
#   python prepare.py prefs --sft_dir=out-sft
#   python dpo.py config/dpo_tasks.py
#   python dpo.py config/dpo_tasks.py --sft_weight=1.0 --beta=0.1        # DPO + NLL on the chosen replies (RPO)
init_from = 'out-sft'
out_dir = 'out-dpo'
data = 'prefs'
loss_type = 'sigmoid'
beta = 2.0            # large: at 0.1 the policy drifts nats from the reference, stops emitting <|end|> and collapses
sft_weight = 0.0
lora_rank = 8
lora_alpha = 16.0
batch_size = 32
max_iters = 450       # about one pass over the ~15,000 pairs; 300 fell under +3 on val with another seed
learning_rate = 5e-4
warmup_iters = 10
min_lr = 5e-5
eval_interval = 150
eval_pairs = 500
eval_tasks = 250
kl_prompts = 128
log_interval = 20
