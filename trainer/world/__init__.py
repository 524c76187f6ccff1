"""The synthetic shape world the embedded tiny model is pretrained on, its prompt checker, and the
scores that show a LoRA taught it something new. Torch-free: PIL and numpy only."""
