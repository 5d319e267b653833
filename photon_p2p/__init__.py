"""photon-p2p: Photon-style federated LLM pre-training over a hivemind peer-to-peer swarm.

Sub-packages, one layer each:
  config.py   typed, validated configs (one per component) composed into RunConfig; configkit.py: how a
              section is declared (opt, Section), type-checked from TOML and turned into flags
  errors.py   PhotonError: a user-facing problem, printed as one line by the CLIs (exit code 2)
  runtime.py  signals and clean stops, hivemind log filtering, progress bars, stopping process groups
  model.py    the decoder-only transformer and its size presets
  data/       tokenizers, packed token shards on disk, the resumable batch sampler
  train/      inner optimizer loop, schedule, evaluation, checkpoints, HF export, outer optimizers
  swarm/      DHT join, identities and signed records, run manifest, heartbeats, round engine
  peer.py     one peer's lifecycle: join -> sync -> rounds -> clean shutdown
  bootstrap.py  the bootstrap node service (a DHT node that does not train)
  status.py   what photon-status gathers from the DHT and how it shows it
  dashboard/  the web page of photon-status --serve and photon-bootstrap --serve
  plot.py     photon-plot's curves from metrics files
  launch.py   photon-swarm: a bootstrap and N peers on one machine
  testbed.py  the field testbed (network namespaces, shaped links, CPU quotas) for tests and benchmarks
  cli/        thin console entry points
"""

__version__ = "0.1.0"


def _silence_bitsandbytes_kernel_notice() -> None:
    """bitsandbytes >= 0.50 logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import on every
    CPU machine without the optional ``kernels`` package. We never use 4-bit matmuls (only 8-bit AdamW states and
    hivemind's 8-bit compression), so the line is noise; drop exactly it, keep everything else bitsandbytes says."""
    import logging

    class _DropKernelNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelNotice())


_silence_bitsandbytes_kernel_notice()
