"""Console entry points. Thin: parse flags, build configs, call the library, turn PhotonError into one line.

  common.py     logging set-up, one-line errors (exit 2), clean Ctrl-C (exit 130)
  peer.py       photon-peer: train alone or join a swarm
  export.py     photon-export: a checkpoint to the Hugging Face Llama layout
  tokenizer.py  photon-tokenizer: train a BPE tokenizer on local text, offline
"""
