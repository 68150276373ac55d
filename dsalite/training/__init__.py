"""Training: losses (LM, MTP, DSA indexer KL), packed data, recipes, the trainer, LoRA, checkpoints."""
