"""What a submission ships: the artifact format and its entropy coder, the size gate, the bundled train_gpt.py."""
