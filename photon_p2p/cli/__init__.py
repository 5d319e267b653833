"""Console entry points. Thin: parse flags, build configs, call the library, turn PhotonError into one line.

common.py     logging set-up, one-line errors (exit 2), clean Ctrl-C (exit 130)
peer.py       photon-peer: train alone or join a swarm
bootstrap.py  photon-bootstrap: a long-lived DHT node that peers join through (does not train)
status.py     photon-status: a run's live peers, manifest and leaderboard, as a table, JSON or a web dashboard
swarm.py      photon-swarm: a bootstrap and N peers on this machine
export.py     photon-export: a checkpoint (the swarm's theta, or the local copy) to the Hugging Face Llama layout
generate.py   photon-generate: sample text from a checkpoint or an export
plot.py       photon-plot: loss, perplexity and throughput curves from metrics files
tokenizer.py  photon-tokenizer: train a BPE tokenizer on local text, offline
"""
