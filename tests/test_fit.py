"""Fitting the workstation (photon_p2p/train/fit.py and its wiring into LocalSession, InnerTrainer and the model).

Proves: ``--device auto`` is the CPU on a machine without CUDA/MPS, and an explicit device the machine lacks is a
one-line error naming --device; the new flags parse (``--micro-batch-size auto`` in flags and TOML, bad values name
the flag). The estimate: its parameter count is the model's; it grows with micro-batch, sequence length and model
size; 8-bit AdamW shrinks the optimizer term and checkpointing the activations. It is checked against the model
three ways, on CPU fp32 (bf16 autocast only through the saved-tensor count; the CUDA and MPS terms are theory):
exactly, the bytes autograd saves for the backward pass (counted with saved-tensor hooks) against the per-layer
formula; exactly, the optimizer's state bytes after a step, AdamW and 8-bit AdamW; roughly, the peak RSS growth of
a subprocess doing real training steps (tiny preset) against the estimated peak, within 0.5x-2x. That RSS check is
only as good as RSS: it sees the allocator's slack too, and it cannot validate the backward-pass transient terms
(two extra layers' worth, three with checkpointing), which were themselves calibrated on such measurements.
The plan: with room, the whole batch in one pass with fp32 AdamW (today's behaviour); under a smaller budget, in
this order, the largest dividing micro-batch that fits, then 8-bit AdamW, then activation checkpointing, then both;
pinned flags are kept; --memory-limit replaces the free memory; nothing fitting is a one-line error with the
parameter count, the estimate, the memory there is and what is needed. Gradient accumulation as planned (2 x 4)
gives the loss and, to fp32 tolerance, the weights of batch 8 in one pass; checkpointing gives the same gradients.
End to end: ``photon-peer --local-only`` under a --memory-limit that forces accumulation logs the one line and
trains; ``--model 1b --memory-limit 1`` exits 2 with the "does not fit" line before packing any data.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from photon_p2p.cli.peer import parse_config
from photon_p2p.config import TrainConfig
from photon_p2p.data import load_tokenizer
from photon_p2p.data.sampler import BatchSampler
from photon_p2p.errors import ConfigError
from photon_p2p.model import ModelArgs, Transformer, build_model_args, pad_vocab
from photon_p2p.train import fit
from photon_p2p.train.fit import GiB, MiB, estimate_memory, param_numels, pick_device, plan_fit
from photon_p2p.train.inner import InnerTrainer
from tests.helpers.local import assert_one_line_error, run_cli, write_corpus

CPU = torch.device("cpu")
HAS_ACCELERATOR = torch.cuda.is_available() or fit._mps_available()
HAS_BNB = fit.adamw8bit_usable(CPU)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_args(**over) -> ModelArgs:
    base = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=2, ffn_hidden=128, max_seq_len=32)
    return ModelArgs(**{**base, **over})


def train_cfg(**over) -> TrainConfig:
    base = dict(max_steps=100, batch_size=8, lr=1e-3, warmup_steps=0, device="cpu", precision="fp32")
    return TrainConfig(**{**base, **over})


def total(args: ModelArgs, micro: int, optimizer: str = "adamw", ckpt: bool = False) -> int:
    return estimate_memory(args, micro_batch=micro, optimizer=optimizer, activation_checkpointing=ckpt).device_total


# --------------------------------------------------------------------------------------------------------------
# device and flags


@pytest.mark.skipif(HAS_ACCELERATOR, reason="this machine has CUDA or MPS")
def test_auto_device_is_the_cpu_here():
    assert pick_device("auto") == CPU
    assert fit.device_reason("auto", CPU) == "auto: no CUDA/MPS"
    assert 0 < fit.available_memory(CPU) <= fit.psutil.virtual_memory().total


@pytest.mark.skipif(HAS_ACCELERATOR, reason="this machine has CUDA or MPS")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1", "mps"])
def test_a_device_this_machine_lacks_is_a_one_line_error(spec):
    with pytest.raises(ConfigError) as e:
        pick_device(spec)
    assert str(e.value).startswith(f"--device {spec}: ") and "not available" in str(e.value)
    assert "\n" not in str(e.value)


def test_fit_flags_parse_and_validate(tmp_path):
    cfg, _ = parse_config(
        [
            "--micro-batch-size",
            "auto",
            "--memory-limit",
            "1.5",
            "--activation-checkpointing",
            "on",
            "--device",
            "mps",
            "--inner-optimizer",
            "auto",
        ]
    )
    t = cfg.train
    assert (t.micro_batch_size, t.memory_limit, t.activation_checkpointing, t.device) == (None, 1.5, "on", "mps")
    defaults, _ = parse_config([])
    assert (
        defaults.train.micro_batch_size,
        defaults.train.inner_optimizer,
        defaults.train.memory_limit,
        defaults.train.activation_checkpointing,
    ) == (None, "auto", None, "auto")
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nmicro_batch_size = "auto"\nbatch_size = 8\n')
    assert parse_config(["--config", str(toml)])[0].train.micro_batch_size is None
    for argv, expected in (
        (["--memory-limit", "0"], "--memory-limit (TOML train.memory_limit) = 0.0: must be > 0"),
        (["--device", "cuda:x"], "--device (TOML train.device) = 'cuda:x': choose auto, cpu"),
        (["--batch-size", "6", "--micro-batch-size", "4"], "must divide --batch-size (6)"),
    ):
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            parse_config(argv)


# --------------------------------------------------------------------------------------------------------------
# the estimate against the model


@pytest.mark.parametrize(
    "args",
    [
        build_model_args("micro", vocab_size=320),
        build_model_args("125m", vocab_size=4096),
        build_model_args("tiny", vocab_size=320, tie_embeddings=False),
        small_args(n_heads=4, n_kv_heads=2),
    ],
)
def test_parameter_count_is_the_models(args):
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(param_numels(args)) == model.num_params()
    assert sorted(param_numels(args)) == sorted(p.numel() for p in model.parameters())


def test_estimate_grows_with_batch_sequence_and_model():
    args = build_model_args("tiny", vocab_size=320)
    by_micro = [total(args, m) for m in (1, 2, 4, 8, 16)]
    assert by_micro == sorted(by_micro) and len(set(by_micro)) == 5
    by_seq = [estimate_memory(args, micro_batch=4, seq_len=s).device_total for s in (16, 32, 64, 128)]
    assert by_seq == sorted(by_seq) and len(set(by_seq)) == 4
    by_model = [
        total(build_model_args(p, vocab_size=4096, seq_len=256), 4)
        for p in ("micro", "tiny", "125m", "350m", "1b", "3b", "7b")
    ]
    assert by_model == sorted(by_model) and len(set(by_model)) == 7


def test_8bit_and_checkpointing_and_bf16_reduce_the_estimate():
    args = build_model_args("125m", vocab_size=4096, seq_len=1024)
    plain = estimate_memory(args, micro_batch=4)
    eight = estimate_memory(args, micro_batch=4, optimizer="adamw8bit")
    ckpt = estimate_memory(args, micro_batch=4, activation_checkpointing=True)
    bf16 = estimate_memory(args, micro_batch=4, compute_dtype=torch.bfloat16)
    assert eight.optimizer < 0.3 * plain.optimizer and eight.device_total < plain.device_total
    assert ckpt.activations < 0.3 * plain.activations and ckpt.device_total < plain.device_total
    assert bf16.activations < plain.activations
    both = estimate_memory(args, micro_batch=4, optimizer="adamw8bit", activation_checkpointing=True)
    assert both.device_total < min(eight.device_total, ckpt.device_total)


def saved_bytes(model: Transformer, x: torch.Tensor, autocast: bool = False) -> int:
    """Bytes autograd keeps for the backward pass of one loss, parameters excluded, each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(x, x)
    return sum(seen.values())


@pytest.mark.parametrize(
    ("args", "bf16"),
    [
        (build_model_args("micro", vocab_size=320), False),
        (build_model_args("tiny", vocab_size=320), False),
        (small_args(n_heads=4, n_kv_heads=2, max_seq_len=64), False),
        (build_model_args("tiny", vocab_size=320), True),
    ],
)
def test_saved_activations_match_the_per_layer_formula(args, bf16):
    torch.manual_seed(0)
    model = Transformer(args).train()
    batch = 4
    x = torch.randint(0, args.vocab_size, (batch, args.max_seq_len))
    tokens = batch * args.max_seq_len
    c = 2 if bf16 else 4
    # the blocks, the final norm (its input, normalised fp32 and compute-dtype output) and the log-softmax output
    # (fp32, V per token); the token ids and the backward-pass terms are not saved tensors
    formula = tokens * (
        args.n_layers * fit.activation_bytes_per_token_layer(args, c) + (8 + c) * args.d_model + 4 * args.vocab_size
    )
    if bf16:  # autocast's bf16 copies of the weights, counted in the estimate's weights
        formula += 2 * sum(param_numels(args)) - 2 * (args.n_layers * 2 + 1) * args.d_model  # the norms stay fp32
    measured = saved_bytes(model, x, autocast=bf16)
    assert measured == pytest.approx(formula, rel=0.05), (measured, formula)


@pytest.mark.parametrize(
    "optimizer",
    ["adamw", pytest.param("adamw8bit", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed"))],
)
def test_optimizer_state_bytes_match(optimizer):
    args = build_model_args("micro", vocab_size=320)
    torch.manual_seed(0)
    model = Transformer(args)
    trainer = InnerTrainer(model, train_cfg(batch_size=2, inner_optimizer=optimizer), CPU)
    tokens = np.random.default_rng(0).integers(0, 320, 5_000).astype(np.uint16)
    trainer.step(BatchSampler(tokens, seq_len=args.max_seq_len, batch_size=2, seed=0), 0)
    # bitsandbytes shares its quantisation maps between parameters: each storage once, the step counters left out
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for s in trainer.optimizer.state.values()
        for k, t in s.items()
        if isinstance(t, torch.Tensor) and k != "step"
    }
    state = sum(storages.values())
    assert state == pytest.approx(estimate_memory(args, micro_batch=2, optimizer=optimizer).optimizer, rel=0.02)


MEASURE = """
import json, sys
import numpy as np, psutil, torch
from photon_p2p.config import TrainConfig
from photon_p2p.data.sampler import BatchSampler
from photon_p2p.model import Transformer, build_model_args
from photon_p2p.train.inner import InnerTrainer
micro, ckpt = int(sys.argv[1]), sys.argv[2] == "1"
torch.set_num_threads(1)
args = build_model_args("tiny", vocab_size=4096)
tokens = np.random.default_rng(0).integers(0, 4096, 100_000).astype(np.uint16)
def trainer(batch):
    model = Transformer(args)
    model.activation_checkpointing = ckpt
    cfg = TrainConfig(batch_size=batch, device="cpu", precision="fp32", inner_optimizer="adamw")
    return InnerTrainer(model, cfg, torch.device("cpu")), BatchSampler(tokens, seq_len=128, batch_size=batch, seed=0)
t, s = trainer(1)
t.step(s, 0)  # warm-up at micro-batch 1: loads the kernels, so their code and caches are not counted below
del t, s
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak RSS
base = psutil.Process().memory_info().rss
t, s = trainer(micro)
for step in range(3):
    t.step(s, step)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"growth": peak - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_estimate_is_close_to_the_measured_peak_rss():
    """Real steps in fresh processes (both at once: two cores); peak RSS growth over the start vs the estimate."""
    cases = [(16, False), (16, True)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MEASURE, str(m), "1" if c else "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for m, c in cases
    ]
    args = build_model_args("tiny", vocab_size=4096)
    report = []
    for (micro, ckpt), proc in zip(cases, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        growth = json.loads(out.strip().splitlines()[-1])["growth"]
        est = estimate_memory(args, micro_batch=micro, activation_checkpointing=ckpt)
        report.append(
            f"micro-batch {micro} ckpt {ckpt}: measured {growth / MiB:.0f} MiB, estimated "
            f"{est.subtotal / MiB:.0f} MiB (+ margin {est.margin / MiB:.0f} MiB)"
        )
        assert 0.5 * est.subtotal <= growth <= 2.0 * est.subtotal, report[-1]
        assert growth <= est.device_total * 1.25, report[-1]  # the margin covers what the formula misses, roughly
    print("\n".join(report))


# --------------------------------------------------------------------------------------------------------------
# the plan


def test_room_enough_keeps_todays_behaviour():
    plan = plan_fit(small_args(), train_cfg(batch_size=16), CPU, available=64 * GiB)
    assert (plan.micro_batch, plan.accumulation, plan.optimizer, plan.activation_checkpointing) == (
        16,
        1,
        "adamw",
        False,
    )
    line = plan.describe()
    assert line.startswith("device cpu (--device cpu); memory ~") and "of 64.00 GiB free" in line
    assert "micro-batch 16 = batch 16, no accumulation; AdamW, fp32, no activation checkpointing" in line
    assert "\n" not in line


def test_tight_memory_accumulates_with_the_largest_dividing_micro_batch():
    args, cfg = small_args(max_seq_len=64), train_cfg(batch_size=12)
    budget = total(args, 5)  # 4 fits, 6 does not, 5 would but does not divide 12
    plan = plan_fit(args, cfg, CPU, available=budget)
    assert (plan.micro_batch, plan.accumulation, plan.optimizer, plan.activation_checkpointing) == (
        4,
        3,
        "adamw",
        False,
    )
    assert plan.estimate.device_total <= budget
    assert "micro-batch 4 x 3 accumulation = batch 12" in plan.describe()
    assert "batch 12 in one pass needs ~" in plan.describe()
    # a pinned micro-batch is kept, and does not fit where the planner's would not
    pinned = plan_fit(args, train_cfg(batch_size=12, micro_batch_size=2), CPU, available=budget)
    assert pinned.micro_batch == 2 and "as set: --micro-batch-size 2" in pinned.describe()


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_fallbacks_come_in_the_documented_order():
    # weights dominate a long-vocabulary model at short sequences (8-bit helps first); long sequences make the
    # activations dominate, where only checkpointing helps
    args = build_model_args("125m", vocab_size=4096, seq_len=2048)
    cfg = train_cfg(batch_size=8)
    plain1, eight1 = total(args, 1), total(args, 1, "adamw8bit")
    ckpt1, both1 = total(args, 1, ckpt=True), total(args, 1, "adamw8bit", True)
    assert plain1 > eight1 > ckpt1 > both1  # so each budget below picks exactly one mode

    def chosen(budget: int) -> tuple[str, bool, int]:
        p = plan_fit(args, cfg, CPU, available=budget)
        assert p.estimate.device_total <= budget
        return p.optimizer, p.activation_checkpointing, p.micro_batch

    assert chosen(plain1 + 1)[:2] == ("adamw", False)
    assert chosen(plain1 - 1)[:2] == ("adamw8bit", False)
    assert chosen(eight1 - 1)[:2] == ("adamw", True)
    assert chosen(ckpt1 - 1)[:2] == ("adamw8bit", True)
    # each mode again takes the largest micro-batch that fits: at short sequences the weights dominate, and 8-bit
    # AdamW leaves room for 4 sequences where fp32 AdamW had none for 1
    short = build_model_args("125m", vocab_size=4096, seq_len=128)
    assert total(short, 4, "adamw8bit") < total(short, 1)
    assert plan_fit(short, cfg, CPU, available=total(short, 1) - 1).micro_batch == 4
    line = plan_fit(args, cfg, CPU, available=ckpt1 - 1).describe()
    assert "8-bit AdamW, fp32, activation checkpointing" in line and "even micro-batch 1 with AdamW needs ~" in line
    # pinned settings are never changed: no 8-bit with --inner-optimizer adamw, no checkpointing when off
    assert plan_fit(
        args, train_cfg(batch_size=8, inner_optimizer="adamw"), CPU, available=plain1 - 1
    ).activation_checkpointing
    off = train_cfg(batch_size=8, activation_checkpointing="off")
    assert plan_fit(args, off, CPU, available=plain1 - 1).optimizer == "adamw8bit"
    with pytest.raises(ConfigError, match="--activation-checkpointing off as set"):
        plan_fit(args, off, CPU, available=eight1 - 1)


def test_nothing_fits_is_one_line_with_the_numbers():
    args = build_model_args("1b", vocab_size=320)
    with pytest.raises(ConfigError) as e:
        plan_fit(args, train_cfg(batch_size=16, memory_limit=1.0), CPU, model_name="--model 1b", available=64 * GiB)
    msg = str(e.value)
    smallest = estimate_memory(
        args, micro_batch=1, optimizer="adamw8bit" if HAS_BNB else "adamw", activation_checkpointing=True
    )
    assert "\n" not in msg
    assert msg.startswith("--model 1b (1.23B parameters) does not fit: even micro-batch 1 with ")
    assert f"needs ~{fit.human_bytes(smallest.device_total)} (weights 4.60 GiB, gradients 4.60 GiB" in msg
    assert "but --memory-limit allows 1.00 GiB; try a machine or GPU with >= " in msg
    with pytest.raises(ConfigError, match=r"but this machine has 1\.0 MiB free on cpu"):
        plan_fit(small_args(), train_cfg(), CPU, available=MiB)


def test_memory_limit_replaces_the_free_memory_and_swarm_buffers_count_on_a_cpu_peer():
    args = build_model_args("tiny", vocab_size=320)
    limit = (total(args, 8) + total(args, 16)) / 2 / GiB
    plan = plan_fit(args, train_cfg(batch_size=16, memory_limit=limit), CPU, available=1)
    assert plan.micro_batch == 8 and "allowed by --memory-limit" in plan.describe()
    alone = estimate_memory(args, micro_batch=4)
    swarm = estimate_memory(args, micro_batch=4, swarm_outer="fedadam")
    assert swarm.swarm == 4 * alone.params * 8 and swarm.device_total > alone.device_total
    gpu = estimate_memory(args, micro_batch=4, swarm_outer="fedadam", device_type="cuda")
    assert not gpu.swarm_on_device and gpu.subtotal == gpu.training  # theta & co. live in host RAM, not the GPU
    if not HAS_ACCELERATOR:
        before_fork = fit.plan_before_fork(
            args, train_cfg(device="auto"), model_name="--model tiny", outer_optimizer="nesterov"
        )
        assert before_fork is not None and before_fork.estimate.swarm == 4 * alone.params * 6


# --------------------------------------------------------------------------------------------------------------
# what the plan changes in training


def tokens_for_training(n: int = 40_000) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 64, n).astype(np.uint16)


def test_planned_accumulation_trains_like_one_big_batch():
    args = small_args(max_seq_len=32)
    cfg = train_cfg(batch_size=8, lr=1e-3)
    budget = (total(args, 2) + total(args, 4)) // 2
    plan = plan_fit(args, cfg, CPU, available=budget)
    assert (plan.micro_batch, plan.accumulation) == (2, 4)
    torch.manual_seed(0)
    whole = Transformer(args)
    micro = copy.deepcopy(whole)
    t_whole = InnerTrainer(whole, cfg, CPU)
    t_micro = InnerTrainer(micro, plan.apply(cfg), CPU, micro_batch=plan.micro_batch, optimizer=plan.optimizer)
    assert t_micro.accum_steps == 4
    tokens = tokens_for_training()
    s_whole = BatchSampler(tokens, seq_len=32, batch_size=8, seed=1)
    s_micro = BatchSampler(tokens, seq_len=32, batch_size=plan.micro_batch, seed=1)
    for step in range(4):
        a, b = t_whole.step(s_whole, step), t_micro.step(s_micro, step)
        assert a.loss == pytest.approx(b.loss, abs=1e-6) and a.tokens == b.tokens == 8 * 32
    diff = torch.cat([(p - q).abs().flatten() for p, q in zip(whole.parameters(), micro.parameters(), strict=True)])
    # AdamW normalises each coordinate, so fp32 summation-order noise on eps-sized gradients can reach a fraction of
    # lr on a handful of coordinates (tests/test_train.py explains); everything else agrees to 1e-6
    assert (diff > 1e-6).sum().item() <= 5 and diff.max().item() < 0.05 * cfg.lr


def test_activation_checkpointing_gives_the_same_gradients():
    args = small_args(n_layers=3)
    torch.manual_seed(0)
    plain = Transformer(args)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing = True
    x = torch.randint(0, args.vocab_size, (4, args.max_seq_len))
    losses = []
    for model in (plain, ckpt):
        loss = model(x, x)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert saved_bytes(ckpt, x) < 0.5 * saved_bytes(plain, x)  # it does keep less
    ckpt.eval()
    with torch.no_grad():  # evaluation never checkpoints (nothing to save)
        torch.testing.assert_close(ckpt(x), plain.eval()(x))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_auto_optimizer_resumes_with_the_checkpoints_kind():
    args = small_args()
    tokens = tokens_for_training()
    saved = InnerTrainer(Transformer(args), train_cfg(inner_optimizer="adamw8bit"), CPU)
    saved.step(BatchSampler(tokens, seq_len=32, batch_size=8, seed=0), 0)
    auto = InnerTrainer(Transformer(args), train_cfg(inner_optimizer="auto"), CPU, optimizer="adamw")
    auto.load_state_dict(saved.state_dict())
    assert auto.optimizer_kind == "adamw8bit" and type(auto.optimizer).__name__ == "AdamW8bit"
    pinned = InnerTrainer(Transformer(args), train_cfg(inner_optimizer="adamw"), CPU)
    with pytest.raises(Exception, match="--inner-optimizer adamw8bit moments"):
        pinned.load_state_dict(saved.state_dict())


# --------------------------------------------------------------------------------------------------------------
# photon-peer end to end


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("fit") / "corpus", files=3, lines=120)


def test_local_run_under_a_memory_limit_accumulates_and_says_so(corpus, tmp_path):
    args = build_model_args("micro", vocab_size=pad_vocab(load_tokenizer("byte").vocab_size))
    limit = (total(args, 8) + total(args, 16)) / 2 / GiB  # 8 sequences fit, 16 do not
    proc = run_cli(
        "photon-peer",
        [
            "--local-only",
            "--model",
            "micro",
            "--batch-size",
            "16",
            "--max-steps",
            "3",
            "--eval-every",
            "0",
            "--eval-batches",
            "1",
            "--no-progress",
            "--threads",
            "1",
            "--data",
            corpus,
            "--cache-dir",
            tmp_path / "cache",
            "--memory-limit",
            f"{limit:.6f}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "micro-batch" in line]
    assert len(lines) == 1, proc.stderr
    assert "device cpu (auto: no CUDA/MPS)" in lines[0] or HAS_ACCELERATOR
    assert "allowed by --memory-limit; micro-batch 8 x 2 accumulation = batch 16; AdamW, fp32" in lines[0]
    assert "step 3/3" in proc.stderr


def test_a_model_too_big_fails_fast_with_one_line(corpus, tmp_path):
    t0 = time.monotonic()
    proc = run_cli(
        "photon-peer",
        [
            "--local-only",
            "--model",
            "1b",
            "--memory-limit",
            "1",
            "--no-progress",
            "--data",
            corpus,
            "--cache-dir",
            tmp_path / "cache",
        ],
        cwd=tmp_path,
    )
    assert_one_line_error(
        proc,
        "--model 1b (1.23B parameters) does not fit",
        "needs ~",
        "but --memory-limit allows 1.00 GiB",
        "try a machine or GPU with >= ",
    )
    assert not (tmp_path / "cache").exists()  # planned before the data was packed (and the model allocated)
    assert time.monotonic() - t0 < 60
