"""``photon-generate``: sample text from a photon checkpoint or a ``photon-export`` folder.

    photon-generate runs/ckpt --prompt "The quick brown"            # the latest checkpoint of a run
    photon-generate runs/ckpt/step-00000300 --temperature 0         # greedy: always the same text
    photon-generate my-model --num-samples 3 --seed 7 --max-new-tokens 100   # a photon-export folder
    photon-generate runs/swarm-ckpt --weights local                 # this peer's own weights, not the swarm's

The text goes to stdout: the prompt verbatim, then the model's continuation (with several samples, each after a
``=== sample i of n ===`` line); what was loaded goes to stderr. Every prompt is preceded by the end-of-text token,
the start of a document in training, so an empty prompt (the default) asks for a new document from scratch.
Generation stops after --max-new-tokens or at the end-of-text token.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from photon_p2p.cli.common import ArgumentParser, run_main, setup_logging

logger = logging.getLogger("photon_p2p.cli.generate")

N = TypeVar("N", int, float)
WEIGHTS = ("auto", "theta", "local")  # photon_p2p.train.checkpoint.WEIGHT_SOURCES (which imports torch)


def _number(kind: Callable[[str], N], minimum: N, what: str) -> Callable[[str], N]:
    """An argparse type: ``kind`` of the text, at least ``minimum`` (a bad value is one error line)."""

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be at least {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="photon-generate",
        description="Sample text from a model trained by photon-peer: a --checkpoint-dir (its latest checkpoint), "
        "one step-XXXXXXXX checkpoint, or a folder written by photon-export.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "path",
        metavar="PATH",
        help="a --checkpoint-dir of photon-peer, a step-XXXXXXXX directory inside it, or a "
        "photon-export folder (config.json, model.safetensors, tokenizer.json)",
    )
    parser.add_argument(
        "--prompt",
        default="",
        metavar="TEXT",
        help="text to continue (default: empty, i.e. a new document from its start)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=_number(int, 1, "a whole number"),
        default=200,
        metavar="N",
        help="tokens to generate at most per sample (default: 200)",
    )
    parser.add_argument(
        "--temperature",
        type=_number(float, 0.0, "a number"),
        default=0.8,
        metavar="T",
        help="randomness: 0 is greedy (always the most likely token, no randomness), 1 samples the "
        "model's own distribution, higher is wilder (default: 0.8)",
    )
    parser.add_argument(
        "--top-k",
        type=_number(int, 0, "a whole number"),
        default=50,
        metavar="K",
        help="sample only among the K most likely tokens; 0 for no limit (default: 50)",
    )
    parser.add_argument(
        "--seed",
        type=_number(int, 0, "a whole number"),
        default=0,
        metavar="N",
        help="random seed: the same seed, model and flags give the same text; sample i uses seed + i (default: 0)",
    )
    parser.add_argument(
        "--num-samples",
        type=_number(int, 1, "a whole number"),
        default=1,
        metavar="N",
        help="how many texts to generate (default: 1)",
    )
    parser.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHTS,
        help="which weights of a swarm checkpoint: theta (the swarm's model, agreed at the last "
        "round), local (this peer's own copy, possibly part-way through a round), or auto: "
        "theta when the checkpoint has it, else local (default: auto)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="cpu, cuda, cuda:N, or auto (a GPU if there is one, else the CPU) (default: cpu)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is shown only when stderr is a terminal anyway)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="debug, info, warning or error (default: info)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # heavy imports (torch) only once the arguments make sense
    from tqdm.contrib.logging import logging_redirect_tqdm

    from photon_p2p.runtime import progress_enabled
    from photon_p2p.train.generate import generate, load_model, resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.path, args.weights)
    step = f"step {loaded.step}, " if loaded.step is not None else ""
    logger.info(
        "loaded %s (%s%s parameters, weights: %s, tokenizer %s, context %d tokens)",
        loaded.path,
        step,
        f"{loaded.model.num_params():,}",
        loaded.weights,
        loaded.tokenizer.name,
        loaded.model.args.max_seq_len,
    )
    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, top-k {args.top_k or 'off'}"
    logger.info(
        "generating %d sample(s) of up to %d tokens (%s, seed %d) on %s",
        args.num_samples,
        args.max_new_tokens,
        mode,
        args.seed,
        device,
    )
    bar = tqdm(
        total=args.max_new_tokens * args.num_samples,
        desc="generating",
        unit="tok",
        file=sys.stderr,
        disable=not progress_enabled(not args.no_progress),
        dynamic_ncols=True,
        leave=False,
    )
    try:
        with logging_redirect_tqdm():
            texts = generate(
                loaded,
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                seed=args.seed,
                num_samples=args.num_samples,
                device=device,
                on_token=lambda: bar.update(1),
            )
    finally:
        bar.close()
    for i, text in enumerate(texts, start=1):
        if len(texts) > 1:
            if i > 1:
                print()
            print(f"=== sample {i} of {len(texts)} ===")
        print(text, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        setup_logging(args.log_level)
        return run(args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
