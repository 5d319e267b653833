"""The swarm: everything a peer does with other peers (hivemind DHT and DecentralizedAverager).

  dht.py        joining the DHT: multiaddr validation, start/stop without orphaned p2pd, thread-safe DHT calls
  identity.py   the RSA identity file behind a peer ID, and signatures bound to it
  records.py    signed msgpack envelopes and the strict pydantic schemas of everything peers publish
  manifest.py   the run manifest: build, publish, agree on one, refuse conflicting settings, adopt it
  heartbeat.py  each peer's signed progress report (and the thread that keeps the manifest alive)
  state.py      theta (global fp32 parameters) and the delta checks; validating a downloaded state
  averager.py   Butterfly All-Reduce of deltas on DecentralizedAverager, identical results for every member
  rounds.py     the round engine: local steps -> delta -> matchmaking -> all-reduce -> outer step
  faults.py     deliberate faults for tests (PHOTON_FAULTS)

Nothing is imported here: importing ``hivemind`` costs seconds, and ``photon-peer --local-only`` never needs it.
"""
