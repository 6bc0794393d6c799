#!/usr/bin/env python3
"""Train a concept with `coreg-trainer serve`, then generate with it on
`coreg-sampler serve`, as a Python user does: the two services' whole path end to end.

A Rust integration test of `coreg-sampler` starts both servers on loopback with the
tiny model, sharing one object store (a `file://` folder, or a bucket on
`moto_server`), and runs this script against them. The script talks to the servers
only through the stubs generated from `proto/coreg/v1/*.proto` and grpcio.

The pieces a client needs (stub import, health wait, training, generation, PNG
sizes) are module-level functions and the `Client` class, so other scripts
(`demo/demo.py`) import them rather than copy them.

Exit status: 0 when every check passed (the PNGs are written to `--out`, their paths
printed, and a JSON summary written to `--summary`), 1 when a check failed or a server
answered a call with an unexpected error (the message says which), 2 for bad
command-line arguments.
"""

import argparse
import json
import struct
import sys
import time
import zlib
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HEALTH_TIMEOUT_S = 180.0
# How long a unary call may take; the servers answer these from the store.
CALL_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.25
# Generate responses carry inline PNGs: allow more than grpcio's 4 MiB default.
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# Guards the paging loop against a server that keeps handing out tokens.
MAX_PAGES = 10_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The flow's job and requests: small enough for the tiny model on a CPU.
CONCEPT = "pyflow"
CATEGORY = "dog"
REQUEST_ID = "py-sampler-flow-1"
PROMPTS = ["a photo of {}", "{} on the beach"]
SEEDS = [11, 12]
SIDE = 64
DENOISING_STEPS = 4
TTO_STEPS = 2
# Ten times the paper's 5e-4: two steps at 5e-4 move the tiny random model's images by
# one grey level here and there; this makes the difference plain.
TTO_LEARNING_RATE = 5e-3


class FlowError(Exception):
    """A check failed: a server broke its contract."""


def check(condition, message):
    """Raises FlowError with `message` unless `condition` holds."""
    if not condition:
        raise FlowError(message)


class Stubs:
    """The generated modules, imported from a directory that is not installed."""

    def __init__(self, stubs_dir):
        stubs_dir = Path(stubs_dir)
        check(
            (stubs_dir / "coreg" / "v1" / "sampler_pb2.py").is_file(),
            f"no generated stubs under {stubs_dir} "
            "(run tests/clients/python/generate_stubs.sh)",
        )
        path = str(stubs_dir.resolve())
        if path not in sys.path:
            sys.path.insert(0, path)
        from coreg.v1 import (
            common_pb2,
            sampler_pb2,
            sampler_pb2_grpc,
            trainer_pb2,
            trainer_pb2_grpc,
        )

        self.common = common_pb2
        self.trainer = trainer_pb2
        self.trainer_grpc = trainer_pb2_grpc
        self.sampler = sampler_pb2
        self.sampler_grpc = sampler_pb2_grpc


def channel(address):
    """An insecure channel to `address` that accepts large (PNG-carrying) messages."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def wait_until_serving(chan, what, timeout=HEALTH_TIMEOUT_S):
    """Polls `grpc.health.v1` until the server's overall status is SERVING (it loaded
    and warmed its base model)."""
    health = health_pb2_grpc.HealthStub(chan)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as e:
            # UNAVAILABLE while the server is still binding its port.
            last = f"{e.code().name}: {e.details()}"
        time.sleep(POLL_INTERVAL_S)
    raise FlowError(
        f"the {what} did not report SERVING within {timeout:.0f} s (last: {last})"
    )


def png_size(data):
    """(width, height) of a PNG, decoding it fully with Pillow when the interpreter
    has it, else reading the signature and the IHDR chunk (checking its CRC)."""
    check(data[:8] == PNG_SIGNATURE, "the image is not a PNG (bad signature)")
    try:
        import io

        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        try:
            with Image.open(io.BytesIO(data)) as image:
                check(image.format == "PNG", f"Pillow reads a {image.format}, not a PNG")
                image.load()
                return image.size
        except (OSError, ValueError) as e:
            raise FlowError(f"the PNG does not decode: {e}") from e
    check(len(data) >= 33, f"the PNG is {len(data)} bytes, too short for its header")
    length, kind = struct.unpack(">I4s", data[8:16])
    check(kind == b"IHDR" and length == 13, "the PNG does not start with an IHDR chunk")
    (crc,) = struct.unpack(">I", data[29:33])
    check(zlib.crc32(data[12:29]) == crc, "the PNG's IHDR chunk fails its CRC")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def describe_progress(progress):
    """One line for a training progress event."""
    stage = {1: "stage 1 (embedding)", 2: "stage 2 (U-Net)", 3: "writing"}.get(
        progress.stage, "?"
    )
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(progress.losses.items()))
    step_time = progress.timing.step_time
    seconds = step_time.seconds + step_time.nanos / 1e9
    line = f"{stage}: step {progress.step}/{progress.total_steps}"
    if seconds:
        line += f", {seconds:.2f} s/step"
    if losses:
        line += f" ({losses})"
    return line


class Client:
    """Both services, over their own channels, through the generated stubs."""

    def __init__(self, stubs, trainer_channel, sampler_channel, token=None):
        self.pb = stubs
        self.trainer = stubs.trainer_grpc.TrainerServiceStub(trainer_channel)
        self.sampler = stubs.sampler_grpc.SamplerServiceStub(sampler_channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    # ---- names -------------------------------------------------------------------

    def job_state(self, state):
        return self.pb.trainer.JobState.Name(state)

    def finish_reason(self, reason):
        return self.pb.sampler.FinishReason.Name(reason)

    # ---- the trainer -------------------------------------------------------------

    def training_spec(
        self,
        images,
        concept,
        category,
        resolution,
        stage1_steps,
        stage2_steps,
        seed=0,
        batch_size=2,
        rescale_record_at=None,
        rescale_until=None,
        stage2_learning_rate=None,
        checkpoint_every=0,
    ):
        """A job spec with inline images. Unset values take the paper's defaults on
        the server: pass None for them."""
        pb = self.pb.trainer
        stage1 = pb.Stage1Parameters()
        if batch_size is not None:
            stage1.batch_size = batch_size
        if stage1_steps is not None:
            stage1.steps = stage1_steps
        if rescale_record_at is not None:
            stage1.rescale_record_at = rescale_record_at
        if rescale_until is not None:
            stage1.rescale_until = rescale_until
        stage2 = pb.Stage2Parameters()
        if batch_size is not None:
            stage2.batch_size = batch_size
        if stage2_steps is not None:
            stage2.steps = stage2_steps
        if stage2_learning_rate is not None:
            stage2.learning_rate = stage2_learning_rate
        spec = pb.TrainingJobSpec(
            concept_name=concept,
            category=category,
            images=[pb.TrainingImage(data=data) for data in images],
            seed=seed,
            stage1=stage1,
            stage2=stage2,
            checkpoint_every=checkpoint_every,
        )
        if resolution is not None:
            spec.resolution = resolution
        return spec

    def create_job(self, request_id, spec):
        return self.trainer.CreateTrainingJob(
            self.pb.trainer.CreateTrainingJobRequest(request_id=request_id, spec=spec),
            metadata=self.metadata,
            timeout=CALL_TIMEOUT_S,
        )

    def watch_job(self, job_id, timeout, on_progress=None):
        """Follows the job to its end; returns (final job, progress events).
        `on_progress(progress)` is called for each step as it arrives."""
        events = self.trainer.WatchTrainingJob(
            self.pb.trainer.WatchTrainingJobRequest(id=job_id),
            metadata=self.metadata,
            timeout=timeout,
        )
        progress = []
        last = None
        try:
            for event in events:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    progress.append(event.progress)
                    if on_progress:
                        on_progress(event.progress)
                elif kind == "job":
                    last = event.job
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise FlowError(f"job {job_id} did not finish within {timeout:.0f} s") from e
            raise
        check(last is not None, f"the watch of {job_id} ended without a job event")
        return last, progress

    def train(self, request_id, spec, timeout, on_progress=None):
        """Creates the job and watches it to SUCCEEDED; returns (job, progress)."""
        job = self.create_job(request_id, spec)
        check(job.id, "CreateTrainingJob returned a job without an id")
        final, progress = self.watch_job(job.id, timeout, on_progress)
        check(
            final.state == self.pb.trainer.JOB_STATE_SUCCEEDED,
            f"job {job.id} ended {self.job_state(final.state)} (error: {final.error!r})",
        )
        return final, progress

    # ---- the sampler -------------------------------------------------------------

    def concept_ref(self, name, version=""):
        return self.pb.common.ConceptRef(name=name, version=version)

    def get_concept(self, name, version=""):
        return self.sampler.GetConcept(
            self.pb.sampler.GetConceptRequest(concept=self.concept_ref(name, version)),
            metadata=self.metadata,
            timeout=CALL_TIMEOUT_S,
        )

    def list_concepts(self, page_size=1):
        """Every concept, paging `page_size` at a time; returns them in page order."""
        concepts = []
        token = ""
        for _ in range(MAX_PAGES):
            page = self.sampler.ListConcepts(
                self.pb.sampler.ListConceptsRequest(page_size=page_size, page_token=token),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT_S,
            )
            check(
                len(page.concepts) <= page_size,
                f"a page of page_size {page_size} held {len(page.concepts)} concepts",
            )
            concepts.extend(page.concepts)
            token = page.next_page_token
            if not token:
                return concepts
        raise FlowError(f"ListConcepts still had a next page after {MAX_PAGES}")

    def generate_request(
        self,
        concept,
        prompts,
        seeds,
        width,
        height,
        steps,
        tto_steps=None,
        tto_learning_rate=None,
        guidance_scale=None,
    ):
        """A request for one image per prompt, inline PNGs; with `tto_steps`,
        test-time optimization of that many steps per prompt. A size of 0 is the
        model's native size; None leaves `steps` and `guidance_scale` to the
        service's defaults."""
        pb = self.pb.sampler
        request = pb.GenerateRequest(
            concept=concept,
            prompts=prompts,
            seeds=seeds,
            width=width,
            height=height,
            destination=pb.IMAGE_DESTINATION_INLINE,
        )
        if steps is not None:
            request.steps = steps
        if guidance_scale is not None:
            request.guidance_scale = guidance_scale
        if tto_steps:
            request.test_time_optimization.enabled = True
            request.test_time_optimization.steps = tto_steps
            if tto_learning_rate is not None:
                request.test_time_optimization.learning_rate = tto_learning_rate
        return request

    def generate(self, request, timeout, on_progress=None):
        """Runs the request; returns (progress events, images) in arrival order."""
        progress = []
        images = []
        try:
            for event in self.sampler.Generate(
                request, metadata=self.metadata, timeout=timeout
            ):
                kind = event.WhichOneof("event")
                if kind == "progress":
                    progress.append(event.progress)
                    if on_progress:
                        on_progress(event.progress)
                elif kind == "image":
                    images.append(event.image)
                else:
                    raise FlowError("Generate sent an empty event")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise FlowError(f"Generate did not finish within {timeout:.0f} s") from e
            raise
        return progress, images

    def expect_error(self, call, request):
        """Runs `call` (a unary or streaming method), which must fail; returns its
        status code and details."""
        try:
            reply = call(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)
            # A streaming call fails when its events are read.
            if not hasattr(reply, "DESCRIPTOR"):
                for _ in reply:
                    pass
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        raise FlowError(f"{request.DESCRIPTOR.name} succeeded but should have failed")

    def check_images(self, images, request, label):
        """The images answer `request`: one per prompt in order, the prompt and seed
        echoed, COMPLETED, inline PNGs that decode at the requested size (at the size
        they report, for a request of the model's native size). Returns the PNG bytes
        in request order."""
        count = len(request.prompts) * max(request.images_per_prompt, 1)
        check(
            len(images) == count,
            f"{label}: {len(images)} images came back for {count} requested",
        )
        pngs = []
        for position, image in enumerate(images):
            where = f"{label} image {position}"
            check(image.index == position, f"{where} has index {image.index}")
            prompt = request.prompts[position // max(request.images_per_prompt, 1)]
            check(image.prompt == prompt, f"{where} echoes prompt {image.prompt!r}, not {prompt!r}")
            if request.seeds:
                check(
                    image.seed == request.seeds[position],
                    f"{where} reports seed {image.seed}, the request gave "
                    f"{request.seeds[position]}",
                )
            check(
                image.finish_reason == self.pb.sampler.FINISH_REASON_COMPLETED,
                f"{where} finished {self.finish_reason(image.finish_reason)}",
            )
            check(
                image.WhichOneof("image") == "png",
                f"{where} carries {image.WhichOneof('image')!r}, not inline PNG bytes",
            )
            wanted = (request.width or image.width, request.height or image.height)
            check(
                (image.width, image.height) == wanted,
                f"{where} says {image.width}×{image.height}, "
                f"{wanted[0]}×{wanted[1]} was requested",
            )
            size = png_size(image.png)
            check(
                size == wanted,
                f"{where} decodes as {size[0]}×{size[1]}, "
                f"{wanted[0]}×{wanted[1]} was requested",
            )
            pngs.append(image.png)
        return pngs

    def check_generation_progress(self, progress, request, label):
        """Progress events count denoising steps up to the total and, with test-time
        optimization, report every prompt optimized."""
        check(progress, f"{label}: Generate sent no progress event")
        for p in progress:
            check(p.total_steps > 0, f"{label}: a progress event has total_steps 0")
            check(
                p.step <= p.total_steps,
                f"{label}: a progress event has step {p.step} of {p.total_steps}",
            )
        last = progress[-1]
        check(
            last.step == last.total_steps,
            f"{label}: the last progress event is step {last.step} of {last.total_steps}",
        )
        if request.test_time_optimization.enabled:
            optimized = max(p.optimized_prompts for p in progress)
            check(
                optimized == len(request.prompts),
                f"{label}: progress reports {optimized} prompts optimized of "
                f"{len(request.prompts)}",
            )


def write_pngs(pngs, out_dir, prefix):
    """Writes `pngs` as `<out_dir>/<prefix>-<i>.png`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, png in enumerate(pngs):
        path = out_dir / f"{prefix}-{i}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths


class Flow:
    """The checks, in order."""

    def __init__(self, client, out_dir, job_timeout, generate_timeout):
        self.client = client
        self.pb = client.pb
        self.out_dir = out_dir
        self.job_timeout = job_timeout
        self.generate_timeout = generate_timeout

    def train(self, images):
        """The job runs to SUCCEEDED and writes concept `pyflow`, version: the job id."""
        c = self.client
        spec = c.training_spec(
            images,
            CONCEPT,
            CATEGORY,
            resolution=SIDE,
            stage1_steps=6,
            stage2_steps=2,
            rescale_record_at=2,
            rescale_until=4,
        )
        job, progress = c.train(REQUEST_ID, spec, self.job_timeout)
        check(progress, "the training watch sent no progress event")
        check(
            job.concept.name == CONCEPT,
            f"the job wrote concept {job.concept.name!r}, not {CONCEPT!r}",
        )
        check(
            job.concept.version == job.id,
            f"the concept's version is {job.concept.version!r}, not the job id {job.id!r}",
        )
        return job, progress

    def concept_is_visible(self, job):
        """The sampler sees what the trainer wrote: GetConcept (newest and by
        version) and ListConcepts describe it."""
        c = self.client
        version = job.concept.version
        newest = c.get_concept(CONCEPT)
        by_version = c.get_concept(CONCEPT, version)
        for label, concept in (("newest", newest), ("by version", by_version)):
            check(
                concept.ref.name == CONCEPT and concept.ref.version == version,
                f"GetConcept ({label}) describes {concept.ref.name}/{concept.ref.version}, "
                f"not {CONCEPT}/{version}",
            )
            check(
                concept.token == f"<{CONCEPT}>",
                f"GetConcept ({label}) gives token {concept.token!r}, not '<{CONCEPT}>'",
            )
            check(
                concept.category == CATEGORY,
                f"GetConcept ({label}) gives category {concept.category!r}",
            )
            check(
                list(concept.versions) == [version],
                f"GetConcept ({label}) lists versions {list(concept.versions)}",
            )
            check(concept.base_model_sha256, f"GetConcept ({label}) has no base model hash")
            check(
                concept.HasField("create_time") and concept.create_time.seconds > 0,
                f"GetConcept ({label}) has no create_time",
            )
            check(
                isinstance(json.loads(concept.hyper_parameters_json or "null"), dict),
                f"GetConcept ({label}) hyper_parameters_json is not a JSON object",
            )
        listed = c.list_concepts(page_size=1)
        names = [concept.ref.name for concept in listed]
        check(CONCEPT in names, f"ListConcepts does not list {CONCEPT!r}: {names}")
        check(len(names) == len(set(names)), f"ListConcepts lists a concept twice: {names}")
        entry = listed[names.index(CONCEPT)]
        check(
            entry.ref.version == version,
            f"ListConcepts gives {CONCEPT}'s newest version as {entry.ref.version!r}",
        )
        return newest, names

    def generate(self, job, label, tto_steps=None):
        c = self.client
        request = c.generate_request(
            c.concept_ref(job.concept.name, job.concept.version),
            PROMPTS,
            SEEDS,
            SIDE,
            SIDE,
            DENOISING_STEPS,
            tto_steps=tto_steps,
            tto_learning_rate=TTO_LEARNING_RATE if tto_steps else None,
        )
        progress, images = c.generate(request, self.generate_timeout)
        c.check_generation_progress(progress, request, label)
        pngs = c.check_images(images, request, label)
        return request, progress, pngs

    def refusals(self, job):
        """A prompt that does not name the concept is INVALID_ARGUMENT; an unknown
        concept is NOT_FOUND."""
        c = self.client
        request = c.generate_request(
            c.concept_ref(job.concept.name),
            ["a photo of a dog"],
            [1],
            SIDE,
            SIDE,
            DENOISING_STEPS,
        )
        code, no_slot = c.expect_error(c.sampler.Generate, request)
        check(
            code == grpc.StatusCode.INVALID_ARGUMENT,
            f"a prompt without {{}} gave {code.name} ({no_slot}), not INVALID_ARGUMENT",
        )
        check(
            "{}" in no_slot or f"<{CONCEPT}>" in no_slot,
            f"the refusal of a prompt without {{}} does not say what to write: {no_slot!r}",
        )
        request = c.generate_request(
            c.concept_ref("no-such-concept"),
            ["a photo of {}"],
            [1],
            SIDE,
            SIDE,
            DENOISING_STEPS,
        )
        code, unknown = c.expect_error(c.sampler.Generate, request)
        check(
            code == grpc.StatusCode.NOT_FOUND,
            f"Generate for an unknown concept gave {code.name} ({unknown}), not NOT_FOUND",
        )
        code, unknown_get = c.expect_error(
            c.sampler.GetConcept,
            self.pb.sampler.GetConceptRequest(concept=c.concept_ref("no-such-concept")),
        )
        check(
            code == grpc.StatusCode.NOT_FOUND,
            f"GetConcept of an unknown concept gave {code.name} ({unknown_get}), "
            "not NOT_FOUND",
        )
        return {"no_placeholder": no_slot, "unknown_concept": unknown}

    def run(self, images):
        started = time.monotonic()
        job, training_progress = self.train(images)
        trained = time.monotonic()
        concept, listed = self.concept_is_visible(job)

        plain_request, plain_progress, plain = self.generate(job, "plain")
        _, _, again = self.generate(job, "plain (again)")
        check(
            again == plain,
            "the same plain request (same seeds) gave different PNG bytes the second time",
        )
        tto_request, tto_progress, tto = self.generate(job, "tto", tto_steps=TTO_STEPS)
        for i, (a, b) in enumerate(zip(plain, tto)):
            check(
                a != b,
                f"image {i} with test-time optimization is byte-identical to the plain one",
            )
        generated = time.monotonic()
        refusals = self.refusals(job)

        plain_paths = write_pngs(plain, self.out_dir, "plain")
        tto_paths = write_pngs(tto, self.out_dir, "tto")
        for path in plain_paths + tto_paths:
            print(path)

        def images_summary(request, paths, pngs):
            return [
                {
                    "path": str(path),
                    "prompt": request.prompts[i],
                    "seed": request.seeds[i],
                    "width": request.width,
                    "height": request.height,
                    "bytes": len(png),
                }
                for i, (path, png) in enumerate(zip(paths, pngs))
            ]

        return {
            "job": {
                "id": job.id,
                "state": self.client.job_state(job.state),
                "concept": {"name": job.concept.name, "version": job.concept.version},
                "progress_events": len(training_progress),
            },
            "concept": {
                "name": concept.ref.name,
                "version": concept.ref.version,
                "token": concept.token,
                "category": concept.category,
                "versions": list(concept.versions),
            },
            "listed_concepts": listed,
            "plain": {
                "images": images_summary(plain_request, plain_paths, plain),
                "progress_events": len(plain_progress),
                "finish_reasons": ["FINISH_REASON_COMPLETED"] * len(plain),
            },
            "tto": {
                "steps": TTO_STEPS,
                "learning_rate": TTO_LEARNING_RATE,
                "images": images_summary(tto_request, tto_paths, tto),
                "progress_events": len(tto_progress),
                "optimized_prompts": max(p.optimized_prompts for p in tto_progress),
                "finish_reasons": ["FINISH_REASON_COMPLETED"] * len(tto),
            },
            "repeat_identical": True,
            "tto_differs": True,
            "errors": refusals,
            "seconds": {
                "training": round(trained - started, 1),
                "generation": round(generated - trained, 1),
            },
        }


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Train a concept on the trainer and generate with it on the sampler."
    )
    parser.add_argument("--trainer", required=True, help="the trainer, host:port")
    parser.add_argument("--sampler", required=True, help="the sampler, host:port")
    parser.add_argument(
        "--stubs",
        required=True,
        type=Path,
        help="the directory generate_stubs.sh wrote (holds the `coreg` package)",
    )
    parser.add_argument(
        "--images", required=True, nargs="+", type=Path, help="training photos sent inline"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="the directory the generated PNGs go to"
    )
    parser.add_argument("--summary", type=Path, help="where the JSON summary goes")
    parser.add_argument(
        "--token", help="bearer token for both services (`authorization: Bearer TOKEN`)"
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=600.0,
        help="seconds the training job may take (default 600)",
    )
    parser.add_argument(
        "--generate-timeout",
        type=float,
        default=300.0,
        help="seconds one Generate call may take (default 300)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    images = []
    for path in args.images:
        try:
            images.append(path.read_bytes())
        except OSError as e:
            print(f"sampler_flow: cannot read image {path}: {e}", file=sys.stderr)
            return 2
    try:
        stubs = Stubs(args.stubs)
        with channel(args.trainer) as trainer, channel(args.sampler) as sampler:
            wait_until_serving(trainer, "trainer")
            wait_until_serving(sampler, "sampler")
            client = Client(stubs, trainer, sampler, args.token)
            summary = Flow(client, args.out, args.job_timeout, args.generate_timeout).run(
                images
            )
    except FlowError as e:
        print(f"sampler_flow: FAILED: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(
            f"sampler_flow: FAILED: unexpected {e.code().name} from a server: {e.details()}",
            file=sys.stderr,
        )
        return 1
    text = json.dumps(summary, indent=2) + "\n"
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
