"""Typed, validated configuration: one small keyword-only dataclass per component, composed into ``RunConfig``.

Every field carries its own documentation (``help``) and command-line flag, so ``--help``, TOML files and
validation errors all come from one place. Precedence: built-in default < ``--config run.toml`` < flags.

A TOML file has one table per component, keyed by the field names shown in ``photon-peer --help``::

    [model]
    preset = "tiny"
    [train]
    max_steps = 300
    lr = 3e-3

Unknown tables or keys and values of the wrong type are one-line errors naming the key (with a suggestion).

**Run settings** (what every peer of a run must share, carried by the run manifest) are declared here too, and only
here: a field marked ``shared=True`` (or ``shared=Shared(...)``) in ``TrainConfig`` or ``RoundConfig`` is, with no
other change anywhere, part of the manifest's schema (swarm/records.py builds ``TrainSettings`` and
``RoundSettings`` from these fields: same names, the field's type, Literal choices kept), of its hash, of what a
joining peer adopts and of the conflicts it refuses (swarm/manifest.py). Adding a shared setting is one line::

    lookahead: int = opt(4, metavar="N", help="...", shared=True)          # or shared=Shared(ge=1): a lower bound

A per-peer setting (device, micro-batch, timeouts) is a field without ``shared``. ``Shared(resolved=...)`` shares
the value of a property instead of the raw field, for a default that depends on other fields (``warmup_steps``
travels as ``TrainConfig.warmup``, ``outer_lr`` as ``RoundConfig.effective_outer_lr``): the manifest then holds the
resolved number, so peers whose defaults would resolve differently cannot disagree silently. Adding, removing or
renaming a shared field changes what peers exchange (the manifest's schema and hash; peers of the older version
reject the new manifest): bump PROTOCOL_VERSION in swarm/records.py with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from photon_p2p import configkit
from photon_p2p.configkit import (  # noqa: F401 - re-exported: the rest of the code imports them from here
    Section,
    Shared,
    _field_types,
    add_section_arguments,
    build_config,
    opt,
)
from photon_p2p.errors import ConfigError

# Model presets live in model.py (which imports torch); the names are repeated here so parsing flags stays cheap.
# tests/test_model.py checks that both lists agree.
MODEL_PRESETS = ("micro", "tiny", "125m", "350m", "1b", "3b", "7b")


# --------------------------------------------------------------------------------------------------------------
# component configs


@dataclass(kw_only=True)
class ModelConfig(Section):
    SECTION: ClassVar[str] = "model"

    preset: str = opt(
        "tiny",
        flag="--model",
        metavar="PRESET",
        help=f"model size preset: {', '.join(MODEL_PRESETS)} (micro and tiny train on a CPU in seconds)",
    )
    seq_len: int | None = opt(None, metavar="N", help="tokens per training sequence (default: the preset's)")
    vocab_size: int | None = opt(
        None,
        metavar="N",
        help="embedding rows (default: the tokenizer's vocabulary rounded up to a multiple "
        "of 64); must be at least the tokenizer's vocabulary",
    )
    tie_embeddings: bool = opt(True, help="share the input embedding and output projection weights")

    def validate(self) -> None:
        self.require(
            "preset", self.preset in MODEL_PRESETS, f"unknown preset; choose one of {', '.join(MODEL_PRESETS)}"
        )
        self.require("seq_len", self.seq_len is None or self.seq_len >= 8, "must be at least 8")
        self.require("vocab_size", self.vocab_size is None or self.vocab_size >= 2, "must be at least 2")


@dataclass(kw_only=True)
class DataConfig(Section):
    SECTION: ClassVar[str] = "data"

    paths: list[str] = opt(
        default_factory=list,
        flag="--data",
        metavar="PATH",
        help="your training text: files, directories or globs (.txt, .md, .py, .rst, .jsonl with a "
        "'text' field, .parquet with a text column; .gz accepted). 'default' means the Python "
        "standard library's own sources, which exist on every machine",
    )
    tokenizer: str = opt(
        "byte",
        metavar="FILE",
        help="'byte' (built-in byte-level tokenizer, no files needed) or a Hugging Face tokenizers "
        "JSON file, e.g. one made by photon-tokenizer",
    )
    val_fraction: float = opt(
        0.02, metavar="F", help="fraction of documents held out for validation (never trained on)"
    )
    cache_dir: str | None = opt(
        None,
        metavar="DIR",
        help="where packed token shards are cached (default: $PHOTON_CACHE_DIR or ~/.cache/photon-p2p/shards)",
    )
    partition: str | None = opt(
        None,
        flag="--data-partition",
        metavar="K/N",
        help="train only on every N-th sequence window, starting at K (0-based): disjoint "
        "iid shares of one corpus for N peers, as photon-swarm --split iid does",
    )

    def validate(self) -> None:
        self.require("val_fraction", 0.0 < self.val_fraction < 0.5, "must be in (0, 0.5)")
        self.require("tokenizer", bool(self.tokenizer), "must be 'byte' or a tokenizer JSON file")
        if self.partition is not None:
            m = re.fullmatch(r"(\d+)/(\d+)", self.partition)
            self.require(
                "partition", bool(m) and 0 <= int(m.group(1)) < int(m.group(2)), "use K/N with 0 <= K < N, e.g. 0/3"
            )

    @property
    def partition_tuple(self) -> tuple[int, int]:
        if self.partition is None:
            return (0, 1)
        k, n = self.partition.split("/")
        return int(k), int(n)


@dataclass(kw_only=True)
class TrainConfig(Section):
    """The inner (local) optimisation loop. Photon's recipe: small batches, a high peak learning rate, AdamW with
    betas (0.9, 0.95), cosine decay to ``alpha_f`` x peak after a linear warm-up, gradient clipping at 1.0."""

    SECTION: ClassVar[str] = "train"

    max_steps: int = opt(
        300, metavar="N", help="total optimizer steps (global inner steps in a swarm)", shared=Shared(ge=1)
    )
    batch_size: int = opt(16, metavar="N", help="sequences per optimizer step", shared=Shared(ge=1))
    micro_batch_size: int | None = opt(
        None,
        metavar="N|auto",
        none_as="auto",
        help="sequences per forward/backward pass, a divisor of --batch-size; "
        "gradients are accumulated up to --batch-size. auto: the largest that "
        "fits in memory (the whole batch when it fits)",
    )
    lr: float = opt(1e-3, metavar="LR", help="peak learning rate of the inner AdamW", shared=True)
    warmup_steps: int | None = opt(
        None,
        metavar="N",
        help="linear warm-up steps (default: 10%% of --max-steps)",
        shared=Shared(ge=0, resolved="warmup"),
    )
    alpha_f: float = opt(
        0.1, metavar="F", help="the cosine schedule decays to alpha_f x peak lr (Photon: 0.1)", shared=True
    )
    weight_decay: float = opt(
        0.1, metavar="W", help="AdamW weight decay (not applied to norms and biases)", shared=True
    )
    grad_clip: float = opt(1.0, metavar="NORM", help="clip the global gradient norm to this (0 disables)", shared=True)
    inner_optimizer: Literal["adamw", "adamw8bit", "auto"] = opt(
        "auto",
        metavar="NAME",
        help="adamw (torch, fused on CUDA), adamw8bit (bitsandbytes 8-bit states: a quarter "
        "of the moments' memory) or auto (adamw, or adamw8bit when memory is tight)",
    )
    device: str = opt(
        "auto", metavar="DEV", help="auto (CUDA if available, then MPS, else CPU), cpu, cuda, cuda:N or mps"
    )
    memory_limit: float | None = opt(
        None,
        metavar="GIB",
        help="plan training to fit in this many GiB of the device's memory instead of "
        "what it reports free (leave room for other programs, or override a "
        "cautious estimate); the plan is logged in one line at start-up",
    )
    activation_checkpointing: Literal["auto", "on", "off"] = opt(
        "auto",
        metavar="MODE",
        help="recompute each block's activations in the backward pass: about a third more "
        "compute for far less memory. auto: only when nothing else fits",
    )
    precision: Literal["auto", "bf16", "fp32"] = opt(
        "auto", metavar="P", help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32"
    )
    compile: bool = opt(False, help="torch.compile the model (faster steps after a slow first one)")
    threads: int | None = opt(
        None,
        metavar="N",
        help="CPU threads for torch (default: torch's choice). Give each peer its share of the "
        "cores when several run on one machine",
    )
    seed: int = opt(0, metavar="N", help="seed for initialisation and data order")
    eval_every: int = opt(100, metavar="N", help="validation loss/perplexity every N steps (0: only at the end)")
    eval_batches: int = opt(16, metavar="N", help="validation batches per evaluation")
    log_every: int = opt(
        10,
        metavar="N",
        help="write a 'step' metrics record (loss, lr, grad norm, tokens/s, MFU, peak memory) every N inner steps",
    )

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "eval_batches", "log_every"):
            self.require(name, getattr(self, name) >= 1, "must be at least 1")
        self.require(
            "micro_batch_size",
            self.micro_batch_size is None
            or (1 <= self.micro_batch_size <= self.batch_size and self.batch_size % self.micro_batch_size == 0),
            f"must divide --batch-size ({self.batch_size})",
        )
        self.require("lr", 0.0 < self.lr < 1.0, "must be in (0, 1)")
        self.require("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must be >= 0")
        self.require("alpha_f", 0.0 <= self.alpha_f <= 1.0, "must be in [0, 1]")
        self.require("weight_decay", self.weight_decay >= 0.0, "must be >= 0")
        self.require("grad_clip", self.grad_clip >= 0.0, "must be >= 0")
        self.require(
            "inner_optimizer", self.inner_optimizer in ("adamw", "adamw8bit", "auto"), "choose adamw, adamw8bit or auto"
        )
        self.require("memory_limit", self.memory_limit is None or self.memory_limit > 0, "must be > 0 (GiB)")
        self.require(
            "activation_checkpointing", self.activation_checkpointing in ("auto", "on", "off"), "choose auto, on or off"
        )
        self.require("precision", self.precision in ("auto", "bf16", "fp32"), "choose auto, bf16 or fp32")
        self.require("eval_every", self.eval_every >= 0, "must be >= 0")
        self.require("threads", self.threads is None or self.threads >= 1, "must be at least 1")
        self.require(
            "device",
            self.device in ("auto", "cpu", "mps") or bool(re.fullmatch(r"cuda(:\d+)?", self.device)),
            "choose auto, cpu, cuda or cuda:N (NVIDIA GPUs) or mps (Apple GPUs)",
        )

    @property
    def micro_batch(self) -> int:
        """The pinned micro-batch, else the whole batch (what runs when nobody plans: LocalSession asks fit.py)."""
        return self.micro_batch_size or self.batch_size

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.max_steps // 10


@dataclass(kw_only=True)
class CheckpointConfig(Section):
    SECTION: ClassVar[str] = "checkpoint"

    dir: str | None = opt(
        None,
        flag="--checkpoint-dir",
        metavar="DIR",
        help="write checkpoints here (model, optimizer, sampler position, RNG, config)",
    )
    every: int = opt(100, flag="--checkpoint-every", metavar="N", help="checkpoint every N steps (and at the end)")
    keep: int = opt(3, flag="--keep-checkpoints", metavar="K", help="keep the last K checkpoints")
    resume: bool = opt(False, help="continue from the latest checkpoint in --checkpoint-dir")
    fresh: bool = opt(False, help="delete existing checkpoints in --checkpoint-dir and start over")

    def validate(self) -> None:
        self.require("every", self.every >= 1, "must be at least 1")
        self.require("keep", self.keep >= 1, "must be at least 1")
        if self.resume and self.fresh:
            raise ConfigError("--resume and --fresh contradict each other: choose one")
        if (self.resume or self.fresh) and not self.dir:
            raise ConfigError(f"{'--resume' if self.resume else '--fresh'} needs --checkpoint-dir")


@dataclass(kw_only=True)
class LogConfig(Section):
    SECTION: ClassVar[str] = "log"

    metrics_file: str | None = opt(
        None,
        metavar="FILE.jsonl",
        help="append JSON records: one every --log-every steps (kind 'step': loss, lr, "
        "grad norm, tokens/s, MFU, peak memory), one per evaluation ('eval') and, "
        "in a swarm, one per round ('round')",
    )
    tensorboard_dir: str | None = opt(
        None,
        metavar="DIR",
        help="also write the records as TensorBoard scalars under DIR/RUN_ID/peer-XXXXXXXX (DIR/local/local-only "
        "with --local-only) "
        "(needs the tensorboard package: pip install 'photon-p2p[tensorboard]')",
    )
    wandb_project: str | None = opt(
        None,
        metavar="NAME",
        help="also log the records to this Weights & Biases project, grouped by run id "
        "and named by peer (needs: pip install 'photon-p2p[wandb]')",
    )
    wandb_mode: Literal["offline", "online"] = opt(
        "offline",
        metavar="MODE",
        help="offline (files under ./wandb, no account or network; upload later with 'wandb sync') or online",
    )
    progress: bool = opt(True, help="show progress bars (off automatically when stderr is not a terminal)")
    log_level: Literal["debug", "info", "warning", "error"] = opt(
        "info", metavar="LEVEL", help="debug, info, warning or error"
    )

    def validate(self) -> None:
        self.require(
            "log_level", self.log_level in ("debug", "info", "warning", "error"), "choose debug, info, warning or error"
        )
        self.require("wandb_mode", self.wandb_mode in ("offline", "online"), "choose offline or online")


RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PEER_ID_PATTERN = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{8,128}$")  # base58, as libp2p prints peer IDs


@dataclass(kw_only=True)
class SwarmConfig(Section):
    """Joining the swarm. Without --initial-peers this peer starts a new swarm and prints addresses others can join."""

    SECTION: ClassVar[str] = "swarm"

    initial_peers: list[str] = opt(
        default_factory=list,
        metavar="MULTIADDR",
        help="multiaddrs of any live peer or bootstrap node, e.g. "
        "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... (printed by photon-bootstrap and "
        "by every peer)",
    )
    run_id: str = opt("photon", metavar="NAME", help="which run to join or start (letters, digits, '-' and '_')")
    run_owner: str | None = opt(
        None,
        metavar="PEER_ID",
        help="the peer ID of the run's owner (its creator prints 'join with --run-id X --run-owner Qm...'): a "
        "manifest signed by anyone else is refused. Without it a peer accepts the run it finds and pins that owner "
        "in its checkpoint",
    )
    host_maddrs: list[str] = opt(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"],
        metavar="MULTIADDR",
        help="where to listen (default: all interfaces, a random TCP port)",
    )
    announce_maddrs: list[str] = opt(
        default_factory=list, metavar="MULTIADDR", help="public addresses to announce when behind port forwarding"
    )
    identity_path: str | None = opt(
        None,
        metavar="FILE",
        help="private key file: the same peer ID across restarts, and the key that signs "
        "this peer's records (default: identity.key in --checkpoint-dir, else a "
        "fresh key per run)",
    )
    client_mode: bool = opt(
        False, help="do not accept incoming connections (behind NAT/firewall): join through relays and peers that do"
    )
    token: str | None = opt(
        None,
        metavar="FILE",
        help="join a private run: the token its owner issued for this peer's ID (photon-bootstrap issue-token "
        "--peer ID); it names the run and the owner's public key, so use the --identity-path it was issued for. "
        "The peer stops cleanly (checkpoint saved) when the token expires",
    )
    use_auto_relay: bool = opt(False, help="look for relays to become reachable from behind NAT")
    join_timeout: float = opt(
        60.0, metavar="SEC", help="give up if no initial peer answers within this time (a loaded machine needs a while)"
    )
    join_existing: bool = opt(
        False,
        help="refuse to start a new run: fail if --run-id is not running yet (a typo "
        "in the run id is then an error, not a lonely new run)",
    )
    local_only: bool = opt(
        False, help="train alone without starting a DHT node (nobody can join): the centralised baseline"
    )
    wait_for_peers: int = opt(
        1,
        metavar="N",
        help="before the first round of a new run, wait until N peers (this one included) are "
        "ready, so that they all start averaging from round 0 (photon-swarm sets it); no "
        "wait if the run is already under way",
    )
    wait_for_peers_timeout: float = opt(
        300.0,
        metavar="SEC",
        help="stop waiting for --wait-for-peers after this long and start with the peers that are there",
    )

    def validate(self) -> None:
        self.require("run_id", bool(RUN_ID_PATTERN.match(self.run_id)), "use 1-64 letters, digits, '-' or '_'")
        self.require(
            "run_owner",
            self.run_owner is None or bool(PEER_ID_PATTERN.match(self.run_owner)),
            "expected the peer ID the run's creator prints (base58: QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N)",
        )
        self.require("join_timeout", self.join_timeout > 0, "must be > 0")
        self.require("wait_for_peers", self.wait_for_peers >= 1, "must be >= 1")
        self.require("wait_for_peers_timeout", self.wait_for_peers_timeout > 0, "must be > 0")
        if self.local_only and self.initial_peers:
            raise ConfigError("--local-only and --initial-peers contradict each other: choose one")
        if self.local_only and self.token:
            raise ConfigError("--local-only and --token contradict each other: a token is for joining a private run")


@dataclass(kw_only=True)
class RoundConfig(Section):
    """Federated rounds: train --local-steps inner steps, average the pseudo-gradient theta - local with the peers
    ready for the same round (Butterfly All-Reduce), apply the outer optimizer. Photon's recipe is fedavg with
    lr 1.0; DiLoCo's is nesterov with lr 0.7 and momentum 0.9."""

    SECTION: ClassVar[str] = "round"

    local_steps: int = opt(
        100, metavar="N", help="inner steps per round (communication happens once per round)", shared=Shared(ge=1)
    )
    round_seconds: float | None = opt(
        None,
        metavar="SEC",
        help="instead of --local-steps, train as many steps as fit in this time "
        "(uneven hardware finishes rounds together)",
        shared=True,
    )
    reset_inner_optimizer: bool = opt(
        False, help="reset the inner AdamW moments at the start of every round (Photon's reset_optimizer)", shared=True
    )
    outer_optimizer: Literal["fedavg", "nesterov", "fedadam"] = opt(
        "fedavg", metavar="NAME", help="fedavg (plain averaging when lr=1), nesterov (DiLoCo) or fedadam", shared=True
    )
    outer_lr: float | None = opt(
        None,
        metavar="LR",
        help="outer learning rate (default: 1.0 fedavg, 0.7 nesterov, 0.01 fedadam)",
        # an explicit --outer-optimizer asks for its default lr: refused if the run's differs
        shared=Shared(resolved="effective_outer_lr", implied_by=("outer_optimizer",)),
    )
    outer_momentum: float = opt(
        0.9, metavar="M", help="momentum of the nesterov outer optimizer (beta1 of fedadam)", shared=True
    )
    compression: Literal["none", "fp16", "blockwise8bit"] = opt(
        "fp16",
        metavar="C",
        help="how pseudo-gradients travel: none (fp32, bit-exact), fp16 or blockwise8bit "
        "(4x fewer bytes than fp32; pays off on slow links)",
        shared=True,
    )
    robust_aggregation: bool = opt(
        True,
        help="reducers clip each peer's part of the update to --robust-clip x the median norm across the group and "
        "drop parts pointing away from the others (bounds a hostile or broken peer; --no-robust-aggregation "
        "averages plainly)",
        shared=True,
    )
    robust_clip: float = opt(
        2.0,
        metavar="K",
        help="with --robust-aggregation: clip each part to K x the median norm of that part across the group. "
        "Increase it if honest peers of very different speeds show up as clipped",
        shared=Shared(ge=1),
    )
    target_group_size: int | None = opt(
        None, metavar="N", help="largest all-reduce group (default: everyone ready for the round)"
    )
    min_group_size: int = opt(
        1,
        metavar="N",
        help="smallest group to accept; above 1 the peer waits for a quorum instead of training on alone",
    )
    quorum_timeout: float = opt(
        1800.0,
        metavar="SEC",
        help="with --min-group-size above 1: stop with an error (checkpoint kept) if no "
        "group that large forms within this long",
    )
    matchmaking_time: float = opt(
        10.0,
        metavar="SEC",
        help="how long to wait for peers to finish the same round. Increase it if peers "
        "on slower machines keep missing rounds",
    )
    allreduce_timeout: float = opt(
        60.0, metavar="SEC", help="give up on an all-reduce (and exclude silent peers) after this long"
    )

    def validate(self) -> None:
        self.require("local_steps", self.local_steps >= 1, "must be at least 1")
        self.require("round_seconds", self.round_seconds is None or self.round_seconds > 0, "must be > 0")
        self.require(
            "outer_optimizer",
            self.outer_optimizer in ("fedavg", "nesterov", "fedadam"),
            "choose fedavg, nesterov or fedadam",
        )
        self.require("outer_lr", self.outer_lr is None or 0 < self.outer_lr <= 10, "must be in (0, 10]")
        self.require("outer_momentum", 0 <= self.outer_momentum < 1, "must be in [0, 1)")
        self.require(
            "compression", self.compression in ("none", "fp16", "blockwise8bit"), "choose none, fp16 or blockwise8bit"
        )
        self.require(
            "target_group_size", self.target_group_size is None or self.target_group_size >= 2, "must be at least 2"
        )
        self.require("min_group_size", self.min_group_size >= 1, "must be at least 1")
        self.require("robust_clip", 1.0 <= self.robust_clip <= 1e6, "must be in [1, 1e6]")
        if self.target_group_size is not None and self.min_group_size > self.target_group_size:
            self.fail("min_group_size", f"must not exceed --target-group-size ({self.target_group_size})")
        self.require("matchmaking_time", self.matchmaking_time >= 1.0, "must be at least 1 second")
        self.require("allreduce_timeout", self.allreduce_timeout >= 1.0, "must be at least 1 second")
        self.require("quorum_timeout", self.quorum_timeout > 0, "must be > 0")

    @property
    def effective_outer_lr(self) -> float:
        if self.outer_lr is not None:
            return self.outer_lr
        return {"fedavg": 1.0, "nesterov": 0.7, "fedadam": 0.01}[self.outer_optimizer]


SECTIONS: tuple[type[Section], ...] = (
    ModelConfig,
    DataConfig,
    TrainConfig,
    RoundConfig,
    SwarmConfig,
    CheckpointConfig,
    LogConfig,
)


@dataclass(kw_only=True)
class RunConfig:
    """Everything one peer needs, composed from the component configs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.SECTION: getattr(self, s.SECTION).to_dict() for s in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "config") -> RunConfig:
        """Build from nested dicts (a TOML file, a checkpoint's saved config); strict about unknown keys."""
        values = configkit.check_nested(data, origin, SECTIONS)
        return cls(**{s.SECTION: s(**values.get(s.SECTION, {})) for s in SECTIONS})


def load_toml(path: str | Path, sections: tuple[type[Section], ...] | None = None) -> dict[str, dict[str, Any]]:
    """Read and type-check a TOML config file (by default against photon-peer's sections)."""
    return configkit.load_toml(path, SECTIONS if sections is None else sections)
