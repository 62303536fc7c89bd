# Supervised fine-tuning of the chat base (config/chat_base.py) on the task suite's chats, all weights:
#   python finetune_lora.py config/sft_tasks.py
#   python finetune_lora.py config/sft_tasks.py --lora_rank=8 --learning_rate=1e-3 --min_lr=1e-4 --out_dir=out-sft-lora
init_from = 'out-chat-base'
out_dir = 'out-sft'
data = 'tasks'
lora_rank = 0         # full fine-tuning: at 0.9M parameters LoRA r=8 learns far less in 300 steps (20% vs 44%)
batch_size = 32
max_iters = 300
learning_rate = 5e-4
warmup_iters = 20
min_lr = 5e-5
eval_interval = 100
eval_iters = 10
eval_tasks = 250      # val prompts for the gold accuracy logged at each evaluation
log_interval = 20
