# GPT-2 124M pretraining on a prepared corpus, one node of 8 GPUs:
#   python prepare.py --input=PATH/TO/TEXT_DIR --dataset=openwebtext --tokenizer=gpt2
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2.py
# 12 batch x 1024 tokens x 40 micro-steps = ~0.5M tokens per iteration (GPT-2/GPT-3 small's batch);
# 600k iterations is ~300B tokens.
out_dir = 'out-gpt2'
dataset = 'openwebtext'
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1

wandb_log = False
wandb_project = 'gpt2'
wandb_run_name = 'gpt2-124M'
