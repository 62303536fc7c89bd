# Supervised fine-tuning of the chat base (config/chat_base.py) on the task suite, with LoRA:
#   python finetune_lora.py config/sft_tasks.py
#   python finetune_lora.py config/sft_tasks.py --lora_rank=0 --learning_rate=3e-4 --out_dir=out-sft-full
init_from = 'out-chat-base'
out_dir = 'out-sft'
data = 'tasks'
lora_rank = 8
lora_alpha = 16.0
batch_size = 32
max_iters = 300
learning_rate = 2e-3
warmup_iters = 20
min_lr = 2e-4
eval_interval = 100
eval_iters = 10
eval_tasks = 250
log_interval = 20
