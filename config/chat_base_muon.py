# On top of config/chat_base.py: the chat base trained with Muon for the matrices inside the blocks (muon.py;
# AdamW for the embeddings and the vectors, at 4x its step) in 800 iterations instead of 1,500: val loss 2.789
# over the whole val split against 2.817, and SFT from it (config/sft_tasks.py, unchanged) 67% val / 66% test
# gold accuracy against 45% / 44% (Intel Xeon; docs/experiments.md, "Pretraining with Muon"). Not yet the
# recipe's base: the stages after SFT were tuned on the weaker SFT model.
#   python train.py config/chat_base.py config/chat_base_muon.py
#   python finetune_lora.py config/sft_tasks.py --init_from=out-chat-base-muon
out_dir = 'out-chat-base-muon'
muon = True
muon_lr = 0.02        # 0.01 / 0.02 / 0.03 / 0.04 at 800 iterations, AdamW at 2e-3: 2.846 / 2.838 / 2.847 / 2.868
learning_rate = 8e-3  # AdamW's, for the embeddings and the vectors: 2e-3 / 4e-3 / 8e-3 gave 2.838 / 2.805 / 2.789
max_iters = 800       # with AdamW at 2e-3: 800 2.838 (SFT 60% val), 850 2.810 (65%), 900 2.799 (68%)
lr_decay_iters = 800
min_lr = 8e-4
