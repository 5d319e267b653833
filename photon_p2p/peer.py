"""One peer's lifecycle: join -> agree on the run -> sync -> rounds -> clean shutdown.

Order matters here (docs/design.md, "Traps we design around"): the DHT and the averager are forked *before* the
local model touches a GPU, and the heartbeat thread starts only after the forks. Everything started is stopped in
``finally`` blocks, so an error or Ctrl-C leaves no averager, DHT or p2pd process behind.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from photon_p2p.config import RunConfig
from photon_p2p.data import load_tokenizer
from photon_p2p.errors import CheckpointError
from photon_p2p.model import Transformer
from photon_p2p.runtime import progress_enabled, quiet_hivemind
from photon_p2p.train.checkpoint import Checkpoint
from photon_p2p.train.fit import plan_before_fork
from photon_p2p.train.inner import resolve_device
from photon_p2p.train.metrics import MetricsWriter, open_metrics
from photon_p2p.train.outer import make_outer_optimizer
from photon_p2p.train.session import LocalSession, resolve_model_args
from photon_p2p.train.solo import checkpoint_to_resume

logger = logging.getLogger(__name__)


def run_peer(cfg: RunConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    if cfg.swarm.local_only:
        from photon_p2p.train.solo import run_solo

        return run_solo(cfg)
    return run_swarm_peer(cfg, explicit or set())


def make_compression(name: str):
    from hivemind.compression import BlockwiseQuantization, CompressionInfo, Float16Compression, NoCompression

    if name == "blockwise8bit":
        # hivemind imports bitsandbytes lazily in the averager process: its first step then takes 6-10 s and can
        # time out. Importing (and running) it here, before the fork, makes the child inherit a warm module.
        probe = torch.randn(4096)
        BlockwiseQuantization().extract(BlockwiseQuantization().compress(probe, CompressionInfo.from_tensor(probe)))
        return BlockwiseQuantization()
    return Float16Compression() if name == "fp16" else NoCompression()


def _identity_path(cfg: RunConfig, scratch: Path) -> Path:
    if cfg.swarm.identity_path:
        return Path(cfg.swarm.identity_path)
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir) / "identity.key"  # same peer ID when this peer restarts
    return scratch / "identity.key"


def _print_join_hint(maddrs: list[str], run_id: str, owner: str) -> None:
    """The line a volunteer pastes: the run is named by its id and its owner's peer ID (so nobody can divert them
    to another run under the same id)."""
    joined = " ".join(maddrs)
    print(
        f"peer is up; others can join this run with:\n  photon-peer --initial-peers {joined} --run-id {run_id} "
        f"--run-owner {owner} --data YOUR_DATA",
        file=sys.stderr,
        flush=True,
    )


def run_swarm_peer(cfg: RunConfig, explicit: set[str]) -> dict[str, Any]:
    quiet_hivemind(cfg.log.log_level)
    from photon_p2p.swarm.access import install_log_filter, open_access, start_dht_with_access, watch_expiry
    from photon_p2p.swarm.averager import PhotonAverager, averager_settings
    from photon_p2p.swarm.dht import DHTCalls, stop_dht, visible_maddrs
    from photon_p2p.swarm.heartbeat import HeartbeatPublisher
    from photon_p2p.swarm.identity import Identity
    from photon_p2p.swarm.loop import PeerLoop
    from photon_p2p.swarm.manifest import adopt_manifest, agree_on_manifest, build_manifest
    from photon_p2p.swarm.records import RejectCounter
    from photon_p2p.swarm.robust import round_weight_bound
    from photon_p2p.swarm.state import theta_from_model
    from photon_p2p.swarm.view import SwarmView

    install_log_filter()
    show = progress_enabled(cfg.log.progress)
    scratch = tempfile.TemporaryDirectory(prefix="photon-peer-")
    dht = averager = heartbeat = view = expiry = None
    metrics = MetricsWriter(None)
    try:
        # everything that can fail on bad local input fails here, before any process is started
        resume = checkpoint_to_resume(cfg)
        proposal_tokenizer = load_tokenizer(cfg.data.tokenizer)
        proposal_args = resolve_model_args(cfg, proposal_tokenizer)
        plan_before_fork(
            proposal_args,
            cfg.train,
            model_name=f"--model {cfg.model.preset}",
            outer_optimizer=cfg.round.outer_optimizer,
        )  # a model too big fails before the DHT starts
        identity = Identity.load_or_create(_identity_path(cfg, Path(scratch.name)))
        metrics = open_metrics(
            cfg.log, group=cfg.swarm.run_id, name=f"peer-{identity.peer_id.to_base58()[-8:]}", config=cfg.to_dict()
        )

        sw = cfg.swarm
        access = open_access(sw.token, identity, alone=not sw.initial_peers, run_id=sw.run_id)
        dht = start_dht_with_access(
            access,
            identity,
            initial_peers=sw.initial_peers,
            host_maddrs=sw.host_maddrs,
            announce_maddrs=sw.announce_maddrs,
            client_mode=sw.client_mode,
            use_auto_relay=sw.use_auto_relay,
            join_timeout=sw.join_timeout,
        )
        calls = DHTCalls(dht)
        maddrs = visible_maddrs(dht)
        proposal = build_manifest(cfg, proposal_tokenizer, proposal_args)
        pinned = resume.state.get("run_owner") if resume is not None else None
        run = agree_on_manifest(
            calls,
            identity,
            proposal,
            explicit,
            join_existing=sw.join_existing,
            owner=sw.run_owner,
            pinned_owner=pinned if isinstance(pinned, str) else None,
        )
        if not sw.client_mode:
            _print_join_hint(maddrs, sw.run_id, run.record.creator)
        elif run.record.creator == identity.peer_id.to_base58():
            print(f"join with --run-id {sw.run_id} --run-owner {run.record.creator}", file=sys.stderr, flush=True)
        cfg, tokenizer, model_args = adopt_manifest(cfg, run.manifest)
        # planned again for the run's settings, before theta is allocated (on a CPU peer theta shares the memory);
        # a GPU peer's device is planned by LocalSession, after the forks
        plan = plan_before_fork(
            model_args, cfg.train, model_name=f"--model {cfg.model.preset}", outer_optimizer=cfg.round.outer_optimizer
        )

        # the global state lives on the CPU in fp32; build it before anything touches the GPU
        torch.manual_seed(cfg.train.seed)
        theta = theta_from_model(Transformer(model_args))
        outer = make_outer_optimizer(
            cfg.round.outer_optimizer, theta, lr=cfg.round.effective_outer_lr, momentum=cfg.round.outer_momentum
        )
        start_round = _restore_global(resume, run, theta, outer) if resume else 0
        delta = [torch.zeros_like(t) for t in theta]
        holder: dict[str, Any] = {}  # the engine exists only after the fork; donors ask it for the state's metadata
        rc = cfg.round
        averager = PhotonAverager(
            delta,
            theta + outer.state_tensors(),
            dht,
            prefix=f"photon_{sw.run_id}_{run.hash[:12]}",
            compression=make_compression(rc.compression),
            get_state_meta=lambda: holder["engine"].state_meta(),
            access=access,
            max_weight=round_weight_bound(cfg, model_args.max_seq_len),
            robust_clip=rc.robust_clip if rc.robust_aggregation else None,
            start=True,
            allow_state_sharing=False,
            declare_state_period=10.0,
            **averager_settings(
                matchmaking_time=rc.matchmaking_time,
                allreduce_timeout=rc.allreduce_timeout,
                target_group_size=rc.target_group_size,
                min_group_size=rc.min_group_size,
                client_mode=sw.client_mode,
            ),
        )

        # announce ourselves now (after the forks, before the slow part): peers starting at the same time then
        # wait for us in matchmaking instead of racing ahead alone
        heartbeat = HeartbeatPublisher(
            calls,
            identity,
            run,
            device=str(resolve_device(cfg.train.device)),
            client_mode=sw.client_mode,
            maddrs=maddrs,
        ).start()
        heartbeat.update(round=start_round, stage="starting", publish_now=True)
        expiry = watch_expiry(access) if access is not None else None
        rejects = RejectCounter()
        view = SwarmView(calls, sw.run_id, run.hash, identity.peer_id.to_base58(), rejects).start()
        session = LocalSession(cfg, tokenizer=tokenizer, model_args=model_args, progress=show, plan=plan)
        if resume is not None:
            session.restore(resume)
        engine = PeerLoop(
            cfg=cfg,
            run=run,
            session=session,
            theta=theta,
            outer=outer,
            delta=delta,
            averager=averager,
            view=view,
            heartbeat=heartbeat,
            rejects=rejects,
            show_progress=show,
            round_=start_round,
        )
        holder["engine"] = engine
        if resume is not None:
            engine.contribution.update(resume.state.get("contribution") or {})
        engine.set_global(round_=start_round, step=session.progress.step)
        if not sw.client_mode:
            averager.allow_state_sharing = True
        view.refresh()
        return engine.loop(metrics)
    finally:
        if expiry is not None:
            expiry.cancel()
        if view is not None:
            view.stop()
        if heartbeat is not None:
            heartbeat.stop()
        if averager is not None and averager.is_alive():
            averager.shutdown()
        stop_dht(dht)
        metrics.close()
        scratch.cleanup()


def _restore_global(ckpt: Checkpoint, run, theta: list[torch.Tensor], outer) -> int:
    """theta, outer state and round from a swarm checkpoint (refusing one from another run, naming what differs)."""
    from photon_p2p.swarm.manifest import manifest_settings, settings_differences

    saved_hash, manifest_hash = ckpt.state.get("manifest_hash"), run.hash
    if saved_hash is None or "theta" not in ckpt.tensors:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written by --local-only training, not by a swarm peer; "
            f"use another --checkpoint-dir"
        )
    if saved_hash != manifest_hash:
        saved = ckpt.state.get("manifest_settings")
        diffs = settings_differences(saved, manifest_settings(run.manifest)) if isinstance(saved, dict) else []
        what = "; ".join(diffs) if diffs else f"manifest {saved_hash[:12]}, this run {manifest_hash[:12]}"
        raise CheckpointError(
            f"checkpoint {ckpt.path} belongs to another run ({what}); resume with the settings it "
            f"was written with, or use another --checkpoint-dir or --run-id"
        )
    owner = ckpt.state.get("run_owner")
    if owner is not None and owner != run.record.creator:
        raise CheckpointError(
            f"checkpoint {ckpt.path} belongs to the run owned by {owner}, not to this one (owner "
            f"{run.record.creator}); use --run-owner {owner}, or another --checkpoint-dir"
        )
    saved_theta, saved_outer = ckpt.tensors["theta"], ckpt.tensors.get("outer", {})
    with torch.no_grad():
        for i, t in enumerate(theta):
            t.copy_(saved_theta[f"{i:05d}"])
        for name, t in outer.state.items():
            t.copy_(saved_outer[name])
    return int(ckpt.state["round"])
