"""The preview room: a warm pipeline per base model with LoRAs mixed as adapters at chosen weights (previewer), the
process the app talks to (worker: `python -m trainer.preview.worker`), and compare and X/Y grids (grids)."""
