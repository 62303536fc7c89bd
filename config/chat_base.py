# The base model of the chat stages: tinyshakespeare with the task suite's train examples mixed in as plain
# text, a 1,028-token BPE with the chat tokens (prepare.py shakespeare_tasks):
#   python train.py config/chat_base.py          then: python finetune_lora.py config/sft_tasks.py
# About 6 minutes on 2 AVX-512 cores. The skills appear late: cheaper bases left SFT weaker or DPO and PPO
# gaining less (docs/experiments.md, "Cheaper base models").
out_dir = 'out-chat-base'
dataset = 'shakespeare_tasks'
eval_interval = 250
eval_iters = 10
log_interval = 50
always_save_checkpoint = False

gradient_accumulation_steps = 1
batch_size = 32   # 4,096 tokens a step: half as many gave SFT 20% instead of 44%
block_size = 128

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3  # a small model takes a large step
max_iters = 1500      # 1,000 gave SFT 21%, 1,500 44%
lr_decay_iters = 1500
min_lr = 2e-4
beta2 = 0.99          # few tokens per step
warmup_iters = 100
