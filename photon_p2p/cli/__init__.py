"""Console entry points. Thin: parse flags, build configs, call the library, turn PhotonError into one line.

  common.py     logging set-up, one-line errors (exit 2), clean Ctrl-C (exit 130)
  peer.py       photon-peer: train alone or join a swarm
  bootstrap.py  photon-bootstrap: a long-lived DHT node that peers join through (does not train)
  status.py     photon-status: a run's live peers and manifest, as a table or JSON
  export.py     photon-export: a checkpoint to the Hugging Face Llama layout
  tokenizer.py  photon-tokenizer: train a BPE tokenizer on local text, offline
"""
