"""Qwen2.5-VL as the instruction encoder: prompts, the PyTorch forward, a tiny test model."""
