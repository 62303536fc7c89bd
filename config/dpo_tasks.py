# DPO of the supervised model on pairs of its own replies, gold-labelled (on-policy preference data)
#   python prepare.py prefs --sft_dir=out-sft
#   python dpo.py config/dpo_tasks.py
#   python dpo.py config/dpo_tasks.py --sft_weight=1.0 --beta=0.1        # DPO + NLL on the chosen replies (RPO)
#   python dpo.py config/dpo_tasks.py --lora_rank=0 --learning_rate=1e-4 --out_dir=out-dpo-full
# Plain DPO (no NLL term). On the small chat model a large beta matters: at beta=0.1 the policy drifts far from
# the reference (KL of several nats), the likelihood of the chosen replies falls along with the rejected ones, it
# stops emitting <|end|> and gold accuracy collapses. beta=2 keeps it near the supervised model. 450 iterations
# of 32 pairs is about one pass over the ~15,000 pairs of prepare.py prefs. Gain over SFT on the 1,000 val prompts,
# seed 1337 / seed 2 (SFT 39.9% / 53.3%): 300 iterations +5.8 / +2.9, 450 +6.8 / +4.8, 600 +8.7 / +4.8; 600 costs
# ~25 s more than 450 in a recipe that has to fit 15 minutes on 2 cores (README, "Fitting 15 minutes").
init_from = 'out-sft'
out_dir = 'out-dpo'
data = 'prefs'
loss_type = 'sigmoid'
beta = 2.0
sft_weight = 0.0
lora_rank = 8
lora_alpha = 16.0
batch_size = 32
max_iters = 450
learning_rate = 5e-4
warmup_iters = 10
min_lr = 5e-5
eval_interval = 150
eval_pairs = 500
eval_tasks = 250
kl_prompts = 128
log_interval = 20
