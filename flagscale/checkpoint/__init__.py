"""The bridge between Hugging Face checkpoints and Megatron distributed checkpoints (`flagscale checkpoint`).

hf.py       an HF folder: config.json <-> train.model settings, safetensors headers and shapes, the files
            export writes (config.json, shards, index, tokenizer files)
mapping.py  which HF tensor rows make each Megatron parameter of each tensor-parallel rank, both ways
bridge.py   import (validate, then torchrun: every rank reads its own slices) and export (load any layout,
            write the HF folder), each written into a temporary folder and renamed at the end
worker.py   what runs in those processes (torch, megatron, safetensors)

Only the standard library loads at import time: `flagscale --help` stays torch-free.
"""
