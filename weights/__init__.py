"""Weights on disk: FLUX.1's, FLUX.2's, CLIP's and ImageReward's (BLIP) files read into our modules (and the CLIP
tokenizer's), LoRA adapters and their files, and the lazy safetensors handles they all read through (tensor_files)."""
