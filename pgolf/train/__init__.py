"""The training stage: the loop, Muon + AdamW, checkpoints, the process group, and the training benchmark."""
