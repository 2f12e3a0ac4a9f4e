"""Tokenizers, long-prompt chunked CLIP encoding, prompt weights and SDXL conditioning."""
