# The classic character-level Shakespeare model: 6 layers, 6 heads, 384 wide, context of 256 characters.
# python train.py config/shakespeare.py   (a GPU: a few minutes; on a CPU use config/shakespeare_cpu.py)
out_dir = 'out-shakespeare-char'
eval_interval = 250  # small model, overfits quickly: evaluate often and keep only the best checkpoint
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small network can take a larger step
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99  # a little higher: few tokens per iteration
warmup_iters = 100
