"""Test helpers: launching real photon processes (peers, bootstrap nodes, swarms) on loopback."""
