"""The command line: `python -m coreg_client train|wait|generate …` (also installed as
`coreg-client`).

    python -m coreg_client train photos/rex --concept rex --category dog
    python -m coreg_client generate --concept rex@JOB_ID --out out/ "a photo of {}"

Addresses come from --trainer/--sampler or COREG_TRAINER_ADDRESS/COREG_SAMPLER_ADDRESS,
the bearer token from --token or COREG_TOKEN. `train` prints the concept it wrote
(`name@version`), `generate` the paths of the PNGs it wrote, one a line; progress goes
to stderr. Exit status: 0 on success, 1 when the service refused or the job failed, 2
for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import grpc

from coreg_client.client import SCHEDULERS, Client, ConceptRef, CoregError


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _concept(text: str) -> ConceptRef:
    try:
        return ConceptRef.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m coreg_client",
        description="Train concepts on coreg-trainer and generate images on coreg-sampler.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--token",
        default=os.environ.get("COREG_TOKEN"),
        help="bearer token (default: $COREG_TOKEN)",
    )
    common.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    common.add_argument("--ca-cert", help="TLS with this CA certificate (PEM file)")
    common.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar on stderr"
    )
    common.add_argument(
        "--timeout", type=float, help="seconds to wait before giving up (default: none)"
    )
    trainer = argparse.ArgumentParser(add_help=False)
    trainer.add_argument(
        "--trainer",
        default=os.environ.get("COREG_TRAINER_ADDRESS"),
        help="the trainer, host:port (default: $COREG_TRAINER_ADDRESS)",
    )
    sampler = argparse.ArgumentParser(add_help=False)
    sampler.add_argument(
        "--sampler",
        default=os.environ.get("COREG_SAMPLER_ADDRESS"),
        help="the sampler, host:port (default: $COREG_SAMPLER_ADDRESS)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        parents=[common, trainer],
        help="train a concept from a folder of photos and wait for it",
    )
    train.add_argument("folder", help="the folder of PNG, JPEG or WebP photos (1-20)")
    train.add_argument("--concept", required=True, help="the concept's name")
    train.add_argument("--category", required=True, help='its super-category, e.g. "dog"')
    train.add_argument("--placeholder", default="", help="its prompt token (default <concept>)")
    train.add_argument("--version", default="", help="the version to write (default: job id)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resolution", type=_positive, help="training size (default 512)")
    train.add_argument("--stage1-steps", type=int, help="embedding steps (default 300)")
    train.add_argument("--stage2-steps", type=int, help="U-Net steps (default 1000; 0 skips)")
    train.add_argument("--batch-size", type=_positive, help="both stages' batch size")
    train.add_argument("--request-id", help="makes a retried submit safe")
    train.add_argument(
        "--no-wait", action="store_true", help="print the job id and return at once"
    )

    wait = commands.add_parser(
        "wait", parents=[common, trainer], help="wait for a training job to end"
    )
    wait.add_argument("job_id")

    generate = commands.add_parser(
        "generate",
        parents=[common, sampler],
        help="generate images of a concept into a folder",
    )
    generate.add_argument("prompts", nargs="+", help="prompts holding {} for the concept")
    generate.add_argument(
        "--concept", required=True, type=_concept, help="name or name@version"
    )
    generate.add_argument("--out", required=True, help="the folder the PNGs go to")
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument("--images-per-prompt", type=_positive, default=1)
    generate.add_argument(
        "--seed", type=int, action="append", dest="seeds", help="one per image, in order"
    )
    generate.add_argument("--steps", type=_positive, help="denoising steps (default 50)")
    generate.add_argument("--guidance-scale", type=float, help="default 7.5")
    generate.add_argument("--width", type=int, default=0, help="default: the model's")
    generate.add_argument("--height", type=int, default=0, help="default: the model's")
    generate.add_argument("--scheduler", choices=SCHEDULERS)
    generate.add_argument("--tto-steps", type=_positive, help="test-time optimization steps")
    generate.add_argument("--tto-learning-rate", type=float)
    return parser


def _client(args, trainer: Optional[str] = None, sampler: Optional[str] = None) -> Client:
    tls = args.ca_cert if args.ca_cert else (True if args.tls else None)
    return Client(trainer=trainer, sampler=sampler, token=args.token, tls=tls)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = not args.quiet
    if args.command in ("train", "wait") and not args.trainer:
        parser.error("no trainer address: pass --trainer or set COREG_TRAINER_ADDRESS")
    if args.command == "generate" and not args.sampler:
        parser.error("no sampler address: pass --sampler or set COREG_SAMPLER_ADDRESS")
    try:
        if args.command == "train":
            with _client(args, trainer=args.trainer) as client:
                options = dict(
                    placeholder=args.placeholder,
                    version=args.version,
                    seed=args.seed,
                    resolution=args.resolution,
                    stage1_steps=args.stage1_steps,
                    stage2_steps=args.stage2_steps,
                    batch_size=args.batch_size,
                )
                if args.no_wait:
                    job = client.submit_folder(
                        args.folder,
                        args.concept,
                        args.category,
                        request_id=args.request_id,
                        **options,
                    )
                    print(job.id)
                else:
                    concept = client.train_from_folder(
                        args.folder,
                        args.concept,
                        args.category,
                        request_id=args.request_id,
                        timeout=args.timeout,
                        progress=progress,
                        **options,
                    )
                    print(concept)
        elif args.command == "wait":
            with _client(args, trainer=args.trainer) as client:
                job = client.wait(args.job_id, timeout=args.timeout, progress=progress)
                print(ConceptRef.from_pb(job.concept))
        else:
            with _client(args, sampler=args.sampler) as client:
                paths = client.generate(
                    args.concept,
                    args.prompts,
                    args.out,
                    negative_prompt=args.negative_prompt,
                    images_per_prompt=args.images_per_prompt,
                    seeds=args.seeds,
                    steps=args.steps,
                    guidance_scale=args.guidance_scale,
                    width=args.width,
                    height=args.height,
                    scheduler=args.scheduler,
                    tto_steps=args.tto_steps,
                    tto_learning_rate=args.tto_learning_rate,
                    timeout=args.timeout,
                    progress=progress,
                )
                for path in paths:
                    print(path)
    except (OSError, ValueError) as e:
        print(f"coreg_client {args.command}: {e}", file=sys.stderr)
        return 2
    except CoregError as e:
        print(f"coreg_client {args.command}: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(
            f"coreg_client {args.command}: {e.code().name}: {e.details()}",
            file=sys.stderr,
        )
        return 1
    return 0
