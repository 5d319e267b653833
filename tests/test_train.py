"""The inner loop's parts: learning-rate schedule, InnerTrainer (accumulation, clipping, AdamW / 8-bit AdamW) and eval.

Proves: the schedule warms up linearly to the peak, decays by a monotone cosine and ends at alpha_f x peak at
max_steps; gradient accumulation is the same optimisation (batch 8 in one pass vs 4 micro-batches of 2, CPU fp32:
the same loss, the same gradient fed to AdamW to 1e-6 at every step, and the same parameters to 1e-6 after three
steps except where AdamW's per-coordinate normalisation amplifies rounding on eps-sized gradients); gradient
clipping engages exactly when the norm exceeds the limit; bitsandbytes' 8-bit AdamW keeps 8-bit states and the
loss falls on CPU; reset_optimizer drops the moments; evaluate() is a deterministic token-weighted mean over fixed
windows and leaves the model as it found it.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from photon_p2p.config import TrainConfig
from photon_p2p.data.sampler import BatchSampler, iter_eval_batches
from photon_p2p.model import ModelArgs, Transformer
from photon_p2p.train.evaluate import evaluate
from photon_p2p.train.inner import InnerTrainer
from photon_p2p.train.schedule import lr_at

CPU = torch.device("cpu")
SEQ = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and on a busy machine OpenMP threads that wait for each other at
    every small op make these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, vocab: int = 320) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(vocab_size=vocab, d_model=64, n_layers=2, n_heads=2, ffn_hidden=128, max_seq_len=SEQ))


def structured_tokens(n: int = 40_000, seed: int = 0) -> np.ndarray:
    """Bytes of text made of a few words: learnable (the loss can fall) yet not trivially periodic."""
    rng = np.random.default_rng(seed)
    words = [b"the", b"quick", b"brown", b"fox", b"jumps", b"over", b"a", b"lazy", b"dog", b"while", b"seven", b"cats"]
    out = bytearray()
    while len(out) < n:
        out += words[rng.integers(len(words))] + b" "
    return np.frombuffer(bytes(out[:n]), dtype=np.uint8).astype(np.uint16)


def train_cfg(**overrides) -> TrainConfig:
    base = dict(max_steps=100, batch_size=8, lr=3e-3, warmup_steps=0, device="cpu", precision="fp32")
    return TrainConfig(**{**base, **overrides})


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


# --------------------------------------------------------------------------------------------------------------
# schedule


def test_warmup_is_linear_and_peaks_at_its_end():
    kw = dict(peak_lr=1e-3, warmup_steps=10, max_steps=100, alpha_f=0.1)
    for s in range(10):
        assert lr_at(s, **kw) == pytest.approx(1e-3 * (s + 1) / 10)
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # the last warm-up step reaches the peak
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # the cosine starts at the peak
    assert max(lr_at(s, **kw) for s in range(200)) == pytest.approx(1e-3)


def test_cosine_decays_monotonically_to_alpha_f_times_peak():
    kw = dict(peak_lr=2e-3, warmup_steps=10, max_steps=100, alpha_f=0.1)
    lrs = [lr_at(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lr_at(100, **kw) == pytest.approx(0.1 * 2e-3)
    assert lr_at(55, **kw) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))  # half way: half the decay
    assert lr_at(99, **kw) > lr_at(100, **kw)
    assert lr_at(500, **kw) == pytest.approx(0.1 * 2e-3)  # past max_steps (a swarm may overshoot): stays at the floor


def test_schedule_edge_cases():
    assert lr_at(0, peak_lr=1.0, warmup_steps=0, max_steps=10, alpha_f=0.0) == pytest.approx(1.0)
    assert lr_at(10, peak_lr=1.0, warmup_steps=0, max_steps=10, alpha_f=0.0) == pytest.approx(0.0)
    assert lr_at(5, peak_lr=1.0, warmup_steps=3, max_steps=10, alpha_f=1.0) == pytest.approx(1.0)  # constant
    # warm-up as long as the run: no division by zero after it
    assert lr_at(10, peak_lr=1.0, warmup_steps=10, max_steps=10, alpha_f=0.1) == pytest.approx(1.0)


def test_trainer_sets_the_scheduled_lr():
    cfg = train_cfg(max_steps=20, warmup_steps=4, alpha_f=0.1)
    model = tiny_model()
    trainer = InnerTrainer(model, cfg, CPU)
    sampler = BatchSampler(structured_tokens(), seq_len=SEQ, batch_size=8, seed=0)
    for step in (0, 3, 12):
        result = trainer.step(sampler, step)
        expected = lr_at(step, peak_lr=cfg.lr, warmup_steps=4, max_steps=20, alpha_f=0.1)
        assert result.lr == expected
        assert all(g["lr"] == expected for g in trainer.optimizer.param_groups)
        assert result.tokens == 8 * SEQ


# --------------------------------------------------------------------------------------------------------------
# inner trainer


def test_grad_accumulation_gives_the_same_update():
    tokens = structured_tokens()
    whole, micro = tiny_model(), tiny_model()
    assert max_param_diff(whole, micro) == 0.0
    t_whole = InnerTrainer(whole, train_cfg(batch_size=8, lr=1e-3), CPU)
    t_micro = InnerTrainer(micro, train_cfg(batch_size=8, micro_batch_size=2, lr=1e-3), CPU)
    assert t_micro.accum_steps == 4
    # the gradient AdamW receives (accumulated and clipped), captured by the optimizer's own step hook
    fed: dict[str, list[list[torch.Tensor]]] = {"whole": [], "micro": []}
    for name, trainer, model in (("whole", t_whole, whole), ("micro", t_micro, micro)):
        trainer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, name=name, model=model: fed[name].append(
                [p.grad.clone() for p in model.parameters()]
            )
        )
    # the same seed gives the same window order; 4 draws of 2 windows are the 8 windows of one draw
    s_whole = BatchSampler(tokens, seq_len=SEQ, batch_size=8, seed=3)
    s_micro = BatchSampler(tokens, seq_len=SEQ, batch_size=2, seed=3)
    start = copy.deepcopy(whole)
    for step in range(3):
        r_whole, r_micro = t_whole.step(s_whole, step), t_micro.step(s_micro, step)
        assert r_whole.loss == pytest.approx(r_micro.loss, abs=1e-6)
        assert r_whole.tokens == r_micro.tokens == 8 * SEQ
        assert r_whole.grad_norm == pytest.approx(r_micro.grad_norm, rel=1e-5)
    assert (s_whole.epoch, s_whole.position) == (s_micro.epoch, s_micro.position)
    for g_whole, g_micro in zip(fed["whole"], fed["micro"], strict=True):
        assert max((a - b).abs().max().item() for a, b in zip(g_whole, g_micro, strict=True)) < 1e-6

    assert max_param_diff(whole, start) > 2e-3  # the steps did move the weights...
    diff = torch.cat([(p - q).abs().flatten() for p, q in zip(whole.parameters(), micro.parameters(), strict=True)])
    # ... identically. AdamW divides each coordinate by its own gradient scale, so on the rare coordinate whose
    # gradient is as small as eps (1e-8) fp32 summation-order noise can move the update by a fraction of lr
    assert (diff > 1e-6).sum().item() <= 5, diff.topk(10).values
    assert diff.max().item() < 0.02 * 1e-3


def test_grad_clipping_engages_above_the_limit_only():
    tokens = structured_tokens()

    def run(clip: float) -> tuple[Transformer, list[float]]:
        model = tiny_model()
        trainer = InnerTrainer(model, train_cfg(grad_clip=clip), CPU)
        sampler = BatchSampler(tokens, seq_len=SEQ, batch_size=8, seed=0)
        return model, [trainer.step(sampler, s).grad_norm for s in range(3)]

    unclipped, norms = run(0.0)  # 0 disables clipping
    assert all(math.isnan(n) for n in norms)  # no norm is computed then
    loose, loose_norms = run(100.0)
    assert min(loose_norms) > 0.1 and max(loose_norms) < 100.0  # the reported norm is the pre-clip norm
    assert max_param_diff(unclipped, loose) == 0.0  # under the limit: untouched
    tight, _ = run(0.05)
    assert max_param_diff(unclipped, tight) > 1e-5  # over it: the update changes


def test_adamw8bit_trains_on_cpu():
    pytest.importorskip("bitsandbytes")
    model = tiny_model()
    trainer = InnerTrainer(model, train_cfg(inner_optimizer="adamw8bit", lr=1e-2, max_steps=25), CPU)
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    sampler = BatchSampler(structured_tokens(), seq_len=SEQ, batch_size=8, seed=0)
    losses = [trainer.step(sampler, s).loss for s in range(25)]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    # tensors of 4096 elements or more keep 8-bit moments (the embedding: 320 x 64)
    emb_state = trainer.optimizer.state[model.tok_embeddings.weight]
    assert emb_state["state1"].dtype == torch.uint8


def test_adamw_trains_and_reset_optimizer_clears_its_state():
    model = tiny_model()
    trainer = InnerTrainer(model, train_cfg(lr=1e-2), CPU)
    sampler = BatchSampler(structured_tokens(), seq_len=SEQ, batch_size=8, seed=0)
    losses = [trainer.step(sampler, s).loss for s in range(25)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    assert len(trainer.optimizer.state) == len(list(model.parameters()))
    assert all(int(st["step"]) == 25 for st in trainer.optimizer.state.values())

    trainer.reset_optimizer()
    assert len(trainer.optimizer.state) == 0
    assert trainer.state_dict()["state"] == {}
    trainer.step(sampler, 30)  # starts again from fresh moments
    assert all(int(st["step"]) == 1 for st in trainer.optimizer.state.values())
    # a fresh optimizer's first step on the same model and batch is the same step
    twin = copy.deepcopy(model)
    sampler_twin = copy.deepcopy(sampler)
    fresh = InnerTrainer(twin, train_cfg(lr=1e-2), CPU)
    trainer.reset_optimizer()
    trainer.step(sampler, 31)
    fresh.step(sampler_twin, 31)
    assert max_param_diff(model, twin) == 0.0


def test_no_gradients_are_left_after_a_step():
    model = tiny_model()
    trainer = InnerTrainer(model, train_cfg(batch_size=4, micro_batch_size=2), CPU)
    trainer.step(BatchSampler(structured_tokens(), seq_len=SEQ, batch_size=2, seed=0), 0)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# evaluation


def test_evaluate_is_a_deterministic_token_weighted_mean():
    model = tiny_model()
    val = structured_tokens(3_000, seed=1)
    model.train()
    before = copy.deepcopy(model.state_dict())
    loss, ppl = evaluate(model, val, seq_len=SEQ, batch_size=4, max_batches=5, device=CPU)
    assert model.training  # the mode is restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ppl == pytest.approx(math.exp(loss))
    assert evaluate(model, val, seq_len=SEQ, batch_size=4, max_batches=5, device=CPU) == (loss, ppl)

    # by hand: the same windows, each batch weighted by its tokens
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in iter_eval_batches(val, seq_len=SEQ, batch_size=4, max_batches=5):
            total += model(x, y).item() * y.numel()
            count += y.numel()
    assert count == 5 * 4 * SEQ
    assert loss == pytest.approx(total / count, rel=1e-6)
    # an untrained model is close to uniform over the vocabulary
    assert abs(loss - math.log(320)) < 0.5


def test_evaluate_handles_a_short_validation_split_and_a_partial_last_batch():
    model = tiny_model()
    short = structured_tokens(20)  # fewer tokens than one window
    loss, ppl = evaluate(model, short, seq_len=SEQ, batch_size=4, max_batches=3, device=CPU)
    assert math.isfinite(loss) and ppl > 1
    odd = structured_tokens(SEQ * 6 + 1)  # 6 windows: one batch of 4, then one of 2
    loss6, _ = evaluate(model, odd, seq_len=SEQ, batch_size=4, max_batches=10, device=CPU)
    assert math.isfinite(loss6)


def test_evaluate_caps_the_perplexity_of_a_diverged_model():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # absurd logits: a huge loss, but no overflow
    loss, ppl = evaluate(model, structured_tokens(2_000), seq_len=SEQ, batch_size=4, max_batches=2, device=CPU)
    assert loss > 50 and ppl == pytest.approx(math.exp(50.0))
