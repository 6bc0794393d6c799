#!/usr/bin/env python3
"""The demo's client: trains a concept from photos on `coreg-trainer serve`, then
generates with it on `coreg-sampler serve` for a few prompts, without and with CoRe
test-time optimization, and writes the PNGs. `demo/run.sh` starts the two services
and runs this; it only needs their addresses, so it also works against services
started by hand.

It speaks to the services through the Python stubs generated from
`proto/coreg/v1/*.proto` (`tests/clients/python/generate_stubs.sh`) and reuses the
client functions of `tests/clients/python/sampler_flow.py`.

Schedules:
  quick  a short run for the tiny random model on a CPU (the default): the numbers
         below, a few minutes on 2 cores;
  paper  the paper's defaults (stage 1: 300 steps of batch 6; stage 2: 1000 steps of
         batch 4; 50 denoising steps; 10 test-time optimization steps) at the
         model's native size: for real SD 2.1 weights on a GPU.
Any single number can be overridden with its option.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "clients" / "python"))

import grpc  # noqa: E402
import sampler_flow as sf  # noqa: E402

PROMPTS = [
    "a photo of {} on the beach",
    "a watercolor painting of {}",
    "{} in the snow, wearing a red hat",
]
SEEDS = [1, 2, 3]

# None leaves a field unset: the service applies the paper's default.
SCHEDULES = {
    "quick": {
        "resolution": None,  # the model's native size, at least 128 px
        "stage1_steps": 100,
        "batch_size": 2,
        "stage2_steps": 40,
        "side": None,  # the training resolution
        "sample_steps": 25,
        "tto_steps": 5,
    },
    "paper": {
        "resolution": None,  # the model's native size, read from its folder
        "stage1_steps": None,
        "batch_size": None,
        "stage2_steps": None,
        "side": 0,  # the model's native size
        "sample_steps": None,
        "tto_steps": 10,
    },
}


def native_size(model_dir):
    """The model's image size in pixels: the U-Net's sample size times the VAE's
    downscaling factor (512 for stable-diffusion-2-1-base, 768 for -2-1)."""
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def slug(prompt, concept):
    """A file name's worth of the prompt, the concept's name where it goes."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower().replace("{}", concept)).strip("-")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", required=True, help="the trainer, host:port")
    p.add_argument("--sampler", required=True, help="the sampler, host:port")
    p.add_argument("--stubs", required=True, type=Path, help="generate_stubs.sh's output")
    p.add_argument("--photos", required=True, type=Path, help="a folder of training photos")
    p.add_argument("--out", required=True, type=Path, help="where images/{plain,tto}/ go")
    p.add_argument("--model", type=Path, help="the model folder (for its native size)")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="quick")
    p.add_argument("--concept", default="demo-toy")
    p.add_argument("--category", default="toy", help="a single CLIP token, e.g. toy, dog")
    p.add_argument("--resolution", type=int, help="training image size in pixels")
    p.add_argument("--stage1-steps", type=int)
    p.add_argument("--stage2-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--side", type=int, help="generated image size in pixels (0: native)")
    p.add_argument("--sample-steps", type=int, help="denoising steps")
    p.add_argument("--tto-steps", type=int, help="test-time optimization steps per prompt")
    p.add_argument("--token", help="bearer token, when the services require one")
    p.add_argument("--job-timeout", type=float, default=24 * 3600.0)
    return p.parse_args(argv)


def settings_from(args):
    s = dict(SCHEDULES[args.schedule])
    for key in (
        "resolution",
        "stage1_steps",
        "stage2_steps",
        "batch_size",
        "side",
        "sample_steps",
        "tto_steps",
    ):
        value = getattr(args, key)
        if value is not None:
            s[key] = value
    native = native_size(args.model) if args.model else None
    if s["resolution"] is None:
        if args.schedule == "quick":
            s["resolution"] = max(native or 128, 128)
        else:
            s["resolution"] = native
    if s["side"] is None:
        s["side"] = s["resolution"] or 0
    # The paper records the embedding's norm after 120 of its 300 stage-1 steps and
    # holds it through step 180: a shorter stage 1 keeps the same fractions.
    s["rescale_record_at"] = s["rescale_until"] = None
    if s["stage1_steps"] is not None and s["stage1_steps"] != 300:
        s["rescale_record_at"] = max(1, s["stage1_steps"] * 2 // 5)
        s["rescale_until"] = max(s["rescale_record_at"], s["stage1_steps"] * 3 // 5)
    return s


def shown(value, default):
    return default if value is None else value


def print_settings(args, s, photos):
    print(f"demo: concept {args.concept!r} (category {args.category!r}), "
          f"{len(photos)} photos from {args.photos}")
    print(f"demo: schedule {args.schedule!r}:")
    print(f"  training at {shown(s['resolution'], '512 (service default)')} px; "
          f"stage 1: {shown(s['stage1_steps'], '300 (paper)')} steps of batch "
          f"{shown(s['batch_size'], '6 (paper)')}; stage 2: "
          f"{shown(s['stage2_steps'], '1000 (paper)')} steps of batch "
          f"{shown(s['batch_size'], '4 (paper)')}")
    side = f"{s['side']} px" if s["side"] else "the model's native size"
    print(f"  generating at {side}, {shown(s['sample_steps'], '50 (paper)')} "
          f"DPM-Solver++ steps, {len(PROMPTS)} prompts, seeds {SEEDS}; "
          f"test-time optimization: {s['tto_steps']} step(s) per prompt")
    if args.schedule == "quick":
        print("  (the paper's full schedule: COREG_DEMO_SCHEDULE=paper, meant for real "
              "SD 2.1 weights on a GPU: see demo/README.md)")


class Printer:
    """Progress lines: about ten per training stage, five per image."""

    def __init__(self):
        self.stage = None
        self.tenth = -1

    def training(self, p):
        # The watch samples the job's status a few times a second rather than sending
        # every step: print the first event in each tenth of the stage.
        tenth = p.step * 10 // max(p.total_steps, 1)
        if p.stage != self.stage or tenth > self.tenth:
            print(f"  {sf.describe_progress(p)}", flush=True)
        self.stage = p.stage
        self.tenth = tenth

    def generation(self, label, images):
        """Denoising restarts at step 0 for each image; test-time optimization, when
        on, runs before each prompt's images."""
        state = {"image": 0, "step": None, "fifth": 0, "optimized": 0}

        def show(p):
            if p.optimized_prompts > state["optimized"]:
                state["optimized"] = p.optimized_prompts
                print(f"  {label}: test-time optimization done for prompt "
                      f"{p.optimized_prompts} of {len(PROMPTS)}", flush=True)
            if p.step == 0 or p.step == state["step"]:
                return
            if state["step"] is None or p.step < state["step"]:
                state["image"] += 1
                state["fifth"] = 0
            state["step"] = p.step
            fifth = p.step * 5 // max(p.total_steps, 1)
            if fifth > state["fifth"]:
                state["fifth"] = fifth
                print(f"  {label}: image {min(state['image'], images)} of {images}: "
                      f"denoising step {p.step}/{p.total_steps}", flush=True)

        return show


def run(args):
    photos = sorted(
        p for p in args.photos.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
    )
    sf.check(photos, f"no .png/.jpg/.webp photos in {args.photos}")
    s = settings_from(args)
    print_settings(args, s, photos)
    stubs = sf.Stubs(args.stubs)
    with sf.channel(args.trainer) as trainer, sf.channel(args.sampler) as sampler:
        sf.wait_until_serving(trainer, "trainer")
        sf.wait_until_serving(sampler, "sampler")
        client = sf.Client(stubs, trainer, sampler, args.token)
        printer = Printer()

        spec = client.training_spec(
            [p.read_bytes() for p in photos],
            args.concept,
            args.category,
            resolution=s["resolution"],
            stage1_steps=s["stage1_steps"],
            stage2_steps=s["stage2_steps"],
            batch_size=s["batch_size"],
            rescale_record_at=s["rescale_record_at"],
            rescale_until=s["rescale_until"],
        )
        # An object, not a pet or a person: the paper's prompt set for objects.
        spec.prompt_set = stubs.common.PROMPT_SET_INANIMATE
        started = time.monotonic()
        job = client.create_job(f"demo-{int(time.time())}", spec)
        print(f"demo: training job {job.id} queued; following it", flush=True)
        job, _ = client.watch_job(job.id, args.job_timeout, printer.training)
        sf.check(
            job.state == stubs.trainer.JOB_STATE_SUCCEEDED,
            f"job {job.id} ended {client.job_state(job.state)}: {job.error}",
        )
        trained = time.monotonic() - started
        concept = client.get_concept(job.concept.name, job.concept.version)
        print(f"demo: trained in {trained:.0f} s: concept {concept.ref.name}/"
              f"{concept.ref.version}, written in prompts as {concept.token}", flush=True)

        ref = client.concept_ref(job.concept.name, job.concept.version)
        results = {}
        for label, tto in (("plain", None), ("tto", s["tto_steps"])):
            request = client.generate_request(
                ref, PROMPTS, SEEDS, s["side"], s["side"], s["sample_steps"], tto_steps=tto
            )
            what = "with test-time optimization" if tto else "without test-time optimization"
            print(f"demo: generating {len(PROMPTS)} images {what}", flush=True)
            t0 = time.monotonic()
            progress, images = client.generate(
                request, 3600.0, printer.generation(label, len(PROMPTS))
            )
            # One COMPLETED PNG of the requested size per prompt, seeds echoed.
            client.check_images(images, request, label)
            out_dir = args.out / label
            out_dir.mkdir(parents=True, exist_ok=True)
            paths = []
            for image in images:
                path = out_dir / f"{image.index + 1}-{slug(image.prompt, args.concept)}.png"
                path.write_bytes(image.png)
                paths.append(path)
            seconds = time.monotonic() - t0
            print(f"demo: {label}: {len(paths)} images in {seconds:.0f} s:")
            for path, image in zip(paths, images):
                print(f"  {path}   ({image.width}×{image.height}, seed {image.seed}, "
                      f"{image.prompt!r})")
            results[label] = {
                "seconds": round(seconds, 1),
                "images": [
                    {"path": str(p), "prompt": i.prompt, "seed": i.seed,
                     "width": i.width, "height": i.height}
                    for p, i in zip(paths, images)
                ],
            }
    summary = {
        "job": job.id,
        "concept": {"name": job.concept.name, "version": job.concept.version,
                    "token": concept.token},
        "schedule": args.schedule,
        "settings": s,
        "training_seconds": round(trained, 1),
        **results,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"demo: summary in {args.out / 'summary.json'}")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except sf.FlowError as e:
        print(f"demo: FAILED: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"demo: FAILED: {e.code().name} from a service: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
