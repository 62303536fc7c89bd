# Fine-tune GPT-2 (124M) on Shakespeare with GPT-2's own BPE tokenizer:
#   python train.py config/finetune_shakespeare.py
# (downloads the weights from the Hugging Face hub once; offline, set init_from to a local
#  directory holding GPT-2's config.json and model.safetensors)
out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
log_interval = 1
always_save_checkpoint = False  # keep only the best: the model overfits within a few epochs

dataset = 'shakespeare'
init_from = 'gpt2'  # or 'gpt2-medium', 'gpt2-large', 'gpt2-xl'

# 1 batch x 32 micro-steps x 1024 tokens = 32,768 tokens per iteration;
# the training split is ~300k tokens, so one epoch is ~9 iterations
batch_size = 1
gradient_accumulation_steps = 32
block_size = 1024
max_iters = 20

# fine-tune at a constant small learning rate
learning_rate = 3e-5
decay_lr = False
dropout = 0.1
