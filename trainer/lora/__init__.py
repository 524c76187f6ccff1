"""The LoRA room: inject (peft layers into a model), read (any common file into one shape), header (a torch-free check
of a file for the app), write (the kohya/A1111 and diffusers layouts, with their metadata), adapters (files loaded
as peft adapters for Preview) and tools (inspect, merge, resize, analyze, bake, card)."""
