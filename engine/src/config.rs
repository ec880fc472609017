//! Model hyper-parameters (from GGUF metadata or a Hugging Face config.json).
