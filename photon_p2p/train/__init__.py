"""The local side of training: everything one peer does with its own model and data.

schedule.py    cosine learning-rate schedule with linear warm-up, driven by the global step
inner.py       the inner optimizer loop: AdamW / 8-bit AdamW, grad accumulation, clipping, autocast
evaluate.py    validation loss and perplexity
checkpoint.py  atomic checkpoints (safetensors + weights-only state), keep-last-K, corruption checks
metrics.py     the JSONL metrics file
session.py     a peer's local training session: tokenizer, data, model, trainer, checkpoints wired together
outer.py       outer optimizers applied to averaged pseudo-gradients (fedavg, nesterov, fedadam)
export.py      export to the Hugging Face Llama layout
"""
