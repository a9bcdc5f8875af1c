"""The OMG-LLaVA network in plain PyTorch + Hugging Face transformers, one paper concept per file."""
