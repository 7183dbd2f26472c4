"""Prompt data and the layout of training batches.

- ``datasets``: prompt files (jsonl, json, parquet) -> tokenized, length-filtered prompts; the
  resumable, shuffled batch loader and the in-order validation pass
- ``batching``: a mini-batch's samples -> data-parallel ranks -> micro-batches (fixed size or token
  budget; padded, or packed and balanced by Karmarkar-Karp), the same micro-batch count on every rank
- ``padding``: one micro-batch -> right-padded ``[b, s]`` tensors
"""
