"""``photon-tokenizer``: train a byte-level BPE tokenizer on your text, or inspect a tokenizer file.

photon-tokenizer train --data corpus/ --vocab-size 8192 --output tok.json
photon-tokenizer info tok.json
photon-peer ... --tokenizer tok.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from photon_p2p.cli.common import ArgumentParser, run_main, setup_logging
from photon_p2p.errors import DataError
from photon_p2p.runtime import progress_enabled

SAMPLE = "To be, or not to be, that is the question: naïve café 日本"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="photon-tokenizer",
        description="Train a byte-level BPE tokenizer on your text, or inspect a tokenizer file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="debug, info, warning or error (default: info)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on your text",
        description="Train a byte-level BPE (GPT-2 style) with end-of-text token <|endoftext|>.",
    )
    train.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text to learn from: files, directories or globs (.txt, .md, .py, .rst, .jsonl with a "
        "'text' field, .parquet with a text column; .gz accepted), or 'default' for the Python "
        "standard library's sources",
    )
    train.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="tokens in the vocabulary, including the 256 bytes and <|endoftext|> (e.g. 8192; "
        "larger means shorter sequences but a bigger embedding)",
    )
    train.add_argument("--output", required=True, metavar="FILE.json", help="where to write the tokenizer JSON")
    train.add_argument(
        "--min-frequency", type=int, default=2, metavar="N", help="merge only pairs seen at least N times (default: 2)"
    )
    train.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    info = sub.add_parser(
        "info",
        help="show a tokenizer's vocabulary size, end-of-text token and fingerprint",
        description="Show what a tokenizer is and how it encodes a sample sentence.",
    )
    info.add_argument("tokenizer", metavar="FILE", help="a tokenizer JSON file, or 'byte' for the built-in one")
    return parser


def _train(args: argparse.Namespace) -> int:
    from photon_p2p.data.tokenizer import train_bpe

    out = Path(args.output)
    if out.exists() and not args.force:
        raise DataError(f"--output {out} already exists; pass --force to overwrite it")
    tok = train_bpe(
        args.data,
        args.vocab_size,
        str(out),
        min_frequency=args.min_frequency,
        progress=progress_enabled(not args.no_progress),
    )
    print(
        f"wrote {out}: {tok.vocab_size} tokens, end-of-text {tok.eos_token!r} (id {tok.eos_id}), "
        f"fingerprint {tok.fingerprint[:16]}"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from photon_p2p.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer, flag="")
    ids = tok.encode(SAMPLE)
    pieces = [tok.decode([i]) for i in ids]
    eos_token = getattr(tok, "eos_token", "<|endoftext|>")
    print(f"tokenizer:   {args.tokenizer} ({tok.name})")
    print(f"vocab size:  {tok.vocab_size}")
    print(f"end of text: {eos_token!r} (id {tok.eos_id})")
    print(f"fingerprint: {tok.fingerprint}")
    print(f"sample:      {SAMPLE!r}")
    print(f"  {len(ids)} tokens ({len(SAMPLE.encode('utf-8')) / max(len(ids), 1):.2f} bytes per token): {ids}")
    print(f"  pieces: {pieces}")
    print(f"  round trip: {'ok' if tok.decode(ids) == SAMPLE else 'LOSSY'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return run_main(lambda: _train(args) if args.command == "train" else _info(args))


if __name__ == "__main__":
    raise SystemExit(main())
