"""The swarm: everything a peer does with other peers (hivemind DHT and DecentralizedAverager).

  dht.py        joining the DHT: multiaddr validation, start/stop without orphaned p2pd, thread-safe DHT calls
  identity.py   the RSA identity file behind a peer ID, and signatures bound to it
  records.py    signed msgpack envelopes and the strict pydantic schemas of everything peers publish
  manifest.py   the run manifest: build, publish, agree on one, refuse conflicting settings, adopt it
  heartbeat.py  each peer's signed progress report (and the thread that keeps the manifest alive)
  state.py      theta (global fp32 parameters) and the delta checks; validating a downloaded state
  averager.py   Butterfly All-Reduce of deltas on DecentralizedAverager, identical results for every member
  robust.py     bounded influence: the weight bound, capped reducer shares, robust (clipping) reducers
  transfer.py   state downloads for joiners: resumable, verified, rate-limited per requester
  snapshot.py   the state-transfer wire format (snapshots, descriptions, bounded frames)
  sync.py       catching up: download, validate (vouched theta hash) and apply a state
  rounds.py     the round engine: local steps -> delta -> matchmaking -> all-reduce -> outer step
  simulate.py   the in-process reference: K peers in one process, exact rounds (photon-swarm --simulate)
  faults.py     deliberate faults for tests (PHOTON_FAULTS)

Nothing is imported here: importing ``hivemind`` costs seconds, and ``photon-peer --local-only`` never needs it.
"""
