"""Checkpoints: reading weights and tokenizers into the dense model.

- `hf_params`: a Hugging Face safetensors directory into the model's NNX state, through strict key maps
- `gguf_file`: a llama.cpp GGUF file read as Hugging Face pieces (`python -m qsjax.convert` writes them)
- `tokenizer`: the model directory's tokenizer and chat template
- `load`: loading for the commands, every failure one `error:` line
The default model (fetched on first use) is `qsjax.weights`."""
