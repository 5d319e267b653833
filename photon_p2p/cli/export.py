"""``photon-export``: turn a photon checkpoint into a Hugging Face Llama directory (weights, config and tokenizer).

photon-export runs/ckpt --output my-model                  # the latest checkpoint: the swarm's model (theta)
photon-export runs/ckpt/step-00000300 --output my-model --dtype bf16
photon-export runs/ckpt --output my-copy --weights local   # this peer's own local copy instead
python -c "import transformers; transformers.LlamaForCausalLM.from_pretrained('my-model')"
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from photon_p2p.cli.common import ArgumentParser, run_main, setup_logging
from photon_p2p.errors import CheckpointError

logger = logging.getLogger("photon_p2p.cli.export")

DTYPES = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="photon-export",
        description="Export a photon-peer checkpoint to the Hugging Face Llama layout (config.json, "
        "model.safetensors, tokenizer files), loadable with transformers.LlamaForCausalLM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a --checkpoint-dir of photon-peer (its latest checkpoint is exported) or one "
        "step-XXXXXXXX directory inside it",
    )
    parser.add_argument(
        "--output", "-o", required=True, metavar="DIR", help="directory to create; it must not exist yet or be empty"
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=DTYPES,
        help="weight precision of the export: fp32 (exact), bf16 or fp16 (half the size) (default: fp32)",
    )
    parser.add_argument(
        "--weights",
        default="auto",
        choices=("auto", "theta", "local"),
        help="which weights of a swarm checkpoint: theta, the swarm's model as of the last round "
        "boundary, or local, this peer's own copy (part-way through a round if the checkpoint "
        "was saved on Ctrl-C); auto takes theta when the checkpoint has it, else the local "
        "weights (--local-only runs have only those) (default: auto)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="debug, info, warning or error (default: info)",
    )
    return parser


def check_output(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"--output {path}: already exists and is not empty; choose a new directory or remove it")


def export(args: argparse.Namespace) -> int:
    out = Path(args.output)
    from photon_p2p.train.checkpoint import find_checkpoint

    step_dir = find_checkpoint(args.checkpoint)
    check_output(out)  # before the slow part: loading and hashing a large checkpoint

    import torch  # heavy imports only once the arguments make sense

    from photon_p2p.data.tokenizer import EOS_TEXT
    from photon_p2p.train.checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
    from photon_p2p.train.export import export_hf

    ckpt = load_checkpoint(step_dir)
    model = model_from_checkpoint(ckpt, source=args.weights)
    tokenizer = tokenizer_from_checkpoint(ckpt)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    which = (
        "the swarm's model (theta)"
        if args.weights != "local" and "theta" in ckpt.tensors
        else "this peer's local weights"
    )
    logger.info(
        "exporting %s of %s (step %d, %s parameters, tokenizer %s)",
        which,
        step_dir,
        ckpt.step,
        f"{model.num_params():,}",
        tokenizer.name,
    )
    export_hf(
        model, out, tokenizer_json=tokenizer.to_json(), eos_token=getattr(tokenizer, "eos_token", EOS_TEXT), dtype=dtype
    )
    print(f"exported {step_dir} to {out}; load it with transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")
    return 0


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        setup_logging(args.log_level)
        return export(args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
