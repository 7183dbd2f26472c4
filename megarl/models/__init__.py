"""HuggingFace <-> Megatron: model families, layer specs, and the model builder."""
