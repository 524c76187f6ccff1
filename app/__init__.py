"""The LoRA Studio web UI (Gradio). Never imports torch: training runs as a subprocess that the UI
talks to through its run folder, and dataset work uses the trainer's torch-free modules."""
