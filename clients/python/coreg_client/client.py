"""A thin helper over the generated coreg.v1 stubs: train a concept from a folder of
photos on `coreg-trainer`, wait for it, generate images of it on `coreg-sampler` and
write them to files.

Everything here is a convenience: the full contract is in the generated modules
(`coreg_client.pb`, `coreg_client.pb_grpc`), and `Client.trainer_stub` and
`Client.sampler_stub` are the raw stubs for whatever the helper does not cover.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import uuid
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from coreg_client._proto.coreg.v1 import common_pb2, sampler_pb2, sampler_pb2_grpc
from coreg_client._proto.coreg.v1 import trainer_pb2, trainer_pb2_grpc
from coreg_client.progress import Progress, ProgressArg, resolve_progress

# The services' limits on training photos (see TrainingImage in trainer.proto).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_IMAGES = 20
MAX_IMAGE_BYTES = 20 << 20
# A CreateTrainingJob request, inline photos included, is at most 64 MiB; this leaves
# room for the rest of the spec.
MAX_INLINE_BYTES = 63 << 20
# Generate answers carry inline PNGs and jobs carry their inline photos: more than
# grpcio's 4 MiB default either way.
MAX_MESSAGE_BYTES = 64 << 20
# Unary calls are answered from the store.
CALL_TIMEOUT_S = 30.0
# RESOURCE_EXHAUSTED from a busy sampler replica is retried this many times, backing
# off from 0.5 s to 8 s.
BUSY_RETRIES = 6
CONCEPT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

_STAGE_PHASES = {
    trainer_pb2.TRAINING_STAGE_EMBEDDING: "embedding",
    trainer_pb2.TRAINING_STAGE_UNET: "unet",
    trainer_pb2.TRAINING_STAGE_WRITING: "writing",
}
_SCHEDULERS = {
    "dpm": sampler_pb2.SCHEDULER_DPM_SOLVER_MULTISTEP,
    "dpm-solver-multistep": sampler_pb2.SCHEDULER_DPM_SOLVER_MULTISTEP,
    "ddim": sampler_pb2.SCHEDULER_DDIM,
    "euler": sampler_pb2.SCHEDULER_EULER_DISCRETE,
    "euler-discrete": sampler_pb2.SCHEDULER_EULER_DISCRETE,
}
SCHEDULERS = tuple(_SCHEDULERS)


class CoregError(Exception):
    """A request the helper could not complete."""


class JobFailed(CoregError):
    """A training job ended FAILED or CANCELLED; `job` is its final state."""

    def __init__(self, job):
        self.job = job
        state = trainer_pb2.JobState.Name(job.state)
        detail = f": {job.error}" if job.error else ""
        super().__init__(f"training job {job.id} ended {state}{detail}")


@dataclasses.dataclass(frozen=True)
class ConceptRef:
    """A stored concept: its name and version ("" for the newest)."""

    name: str
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> "ConceptRef":
        """`name` or `name@version`."""
        name, _, version = text.partition("@")
        if not CONCEPT_NAME.match(name):
            raise ValueError(
                f"{text!r} is not a concept: 1-64 characters of [a-z0-9._-] starting "
                "with a letter or digit, optionally followed by @version"
            )
        return cls(name, version)

    @classmethod
    def from_pb(cls, ref) -> "ConceptRef":
        return cls(ref.name, ref.version)

    def to_pb(self):
        return common_pb2.ConceptRef(name=self.name, version=self.version)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


ConceptArg = Union[str, ConceptRef, common_pb2.ConceptRef]


def as_concept_ref(concept: ConceptArg) -> ConceptRef:
    if isinstance(concept, ConceptRef):
        return concept
    if isinstance(concept, common_pb2.ConceptRef):
        return ConceptRef.from_pb(concept)
    if isinstance(concept, str):
        return ConceptRef.parse(concept)
    raise TypeError(f"a concept is a name, 'name@version' or a ConceptRef, not {concept!r}")


def scan_images(folder: Union[str, os.PathLike]) -> List[Path]:
    """The training photos in `folder`: its PNG, JPEG and WebP files (not its
    subfolders, not hidden files), in name order.

    Raises FileNotFoundError or NotADirectoryError for a missing folder, and
    ValueError when it holds no photos, more than the service takes (20), one over
    20 MiB, or more than one request carries (63 MiB in all).
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no folder {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    images = sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise ValueError(f"no PNG, JPEG or WebP photos in {folder}")
    if len(images) > MAX_IMAGES:
        raise ValueError(
            f"{folder} holds {len(images)} photos; a training job takes at most {MAX_IMAGES}"
        )
    total = 0
    for path in images:
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"{path} is empty")
        if size > MAX_IMAGE_BYTES:
            raise ValueError(f"{path} is {size} bytes; a photo may be at most 20 MiB")
        total += size
    if total > MAX_INLINE_BYTES:
        raise ValueError(
            f"the photos in {folder} add up to {total} bytes, more than one request "
            "carries (63 MiB); upload them to the store and send their keys instead"
        )
    return images


def _seconds(duration) -> Optional[float]:
    seconds = duration.seconds + duration.nanos / 1e9
    return seconds if seconds > 0 else None


def _training_progress(progress) -> Progress:
    timing = progress.timing
    return Progress(
        phase=_STAGE_PHASES.get(progress.stage, "queued"),
        step=progress.step,
        total=progress.total_steps,
        step_seconds=_seconds(timing.step_time) if progress.HasField("timing") else None,
        eta_seconds=_seconds(timing.eta) if timing.HasField("eta") else None,
        losses=dict(progress.losses),
    )


def _credentials(tls) -> Optional[grpc.ChannelCredentials]:
    """`tls` as channel credentials: None/False for plaintext, True for the system's
    roots, a `grpc.ChannelCredentials` as it is, or a CA certificate (PEM bytes or a
    path to a PEM file)."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, bytes):
        return grpc.ssl_channel_credentials(root_certificates=tls)
    if isinstance(tls, (str, os.PathLike)):
        return grpc.ssl_channel_credentials(root_certificates=Path(tls).read_bytes())
    raise TypeError(f"tls must be None, a bool, credentials, PEM bytes or a path, not {tls!r}")


class Client:
    """Both coreg services, over one channel each.

    `trainer` and `sampler` are `host:port` addresses (either may be omitted if only
    the other service is used); `token` is sent as `authorization: Bearer TOKEN`;
    `tls` is None for plaintext, True for TLS with the system's roots, a CA
    certificate (PEM bytes or path) or `grpc.ChannelCredentials`.

    Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        trainer: Optional[str] = None,
        sampler: Optional[str] = None,
        token: Optional[str] = None,
        tls=None,
        call_timeout: float = CALL_TIMEOUT_S,
    ):
        if not trainer and not sampler:
            raise ValueError("give the trainer's address, the sampler's, or both")
        credentials = _credentials(tls)
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]

        def channel(address):
            if credentials is None:
                return grpc.insecure_channel(address, options=options)
            return grpc.secure_channel(address, credentials, options=options)

        self.metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.call_timeout = call_timeout
        self._trainer_channel = channel(trainer) if trainer else None
        self._sampler_channel = channel(sampler) if sampler else None
        self._trainer = (
            trainer_pb2_grpc.TrainerServiceStub(self._trainer_channel)
            if self._trainer_channel
            else None
        )
        self._sampler = (
            sampler_pb2_grpc.SamplerServiceStub(self._sampler_channel)
            if self._sampler_channel
            else None
        )

    # ---- plumbing ------------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for chan in (self._trainer_channel, self._sampler_channel):
            if chan is not None:
                chan.close()

    @property
    def trainer_stub(self) -> trainer_pb2_grpc.TrainerServiceStub:
        if self._trainer is None:
            raise CoregError("this client has no trainer address")
        return self._trainer

    @property
    def sampler_stub(self) -> sampler_pb2_grpc.SamplerServiceStub:
        if self._sampler is None:
            raise CoregError("this client has no sampler address")
        return self._sampler

    # ---- training ------------------------------------------------------------------

    def training_spec(
        self,
        images: Iterable[Union[bytes, str]],
        concept: str,
        category: str,
        *,
        placeholder: str = "",
        version: str = "",
        seed: int = 0,
        resolution: Optional[int] = None,
        stage1_steps: Optional[int] = None,
        stage2_steps: Optional[int] = None,
        batch_size: Optional[int] = None,
        checkpoint_every: Optional[int] = None,
        stage1: Optional[Mapping] = None,
        stage2: Optional[Mapping] = None,
        **spec_fields,
    ):
        """A `TrainingJobSpec`: `images` are encoded photos (bytes) or store keys
        (str). Unset values take the service's defaults (the paper's). `stage1` and
        `stage2` are further `Stage1Parameters`/`Stage2Parameters` fields;
        `spec_fields` any other `TrainingJobSpec` field (e.g. `prompt_set`)."""
        if not CONCEPT_NAME.match(concept):
            raise ValueError(
                f"{concept!r} is not a concept name: 1-64 characters of [a-z0-9._-], "
                "starting with a letter or digit"
            )
        stage1_fields = dict(stage1 or {})
        stage2_fields = dict(stage2 or {})
        if stage1_steps is not None:
            stage1_fields["steps"] = stage1_steps
        if stage2_steps is not None:
            stage2_fields["steps"] = stage2_steps
        if batch_size is not None:
            stage1_fields.setdefault("batch_size", batch_size)
            stage2_fields.setdefault("batch_size", batch_size)
        training_images = [
            trainer_pb2.TrainingImage(data=image)
            if isinstance(image, bytes)
            else trainer_pb2.TrainingImage(object_key=image)
            for image in images
        ]
        spec = trainer_pb2.TrainingJobSpec(
            concept_name=concept,
            category=category,
            token=placeholder,
            concept_version=version,
            images=training_images,
            seed=seed,
            stage1=trainer_pb2.Stage1Parameters(**stage1_fields),
            stage2=trainer_pb2.Stage2Parameters(**stage2_fields),
            **spec_fields,
        )
        if resolution is not None:
            spec.resolution = resolution
        if checkpoint_every is not None:
            spec.checkpoint_every = checkpoint_every
        return spec

    def submit(self, spec, request_id: Optional[str] = None):
        """Creates a training job for `spec`; returns the `TrainingJob` as queued.
        `request_id` makes retries safe (a fresh one is drawn when None)."""
        request_id = request_id or f"py-{uuid.uuid4().hex}"
        return self.trainer_stub.CreateTrainingJob(
            trainer_pb2.CreateTrainingJobRequest(request_id=request_id, spec=spec),
            metadata=self.metadata,
            timeout=self.call_timeout,
        )

    def submit_folder(
        self,
        folder: Union[str, os.PathLike],
        concept: str,
        category: str,
        *,
        request_id: Optional[str] = None,
        **options,
    ):
        """Submits the photos in `folder` (see `scan_images`) as a job training
        `concept` from `category`; returns the queued `TrainingJob` without waiting.
        `options` are `training_spec`'s."""
        images = [path.read_bytes() for path in scan_images(folder)]
        spec = self.training_spec(images, concept, category, **options)
        return self.submit(spec, request_id=request_id)

    def train_from_folder(
        self,
        folder: Union[str, os.PathLike],
        concept: str,
        category: str,
        *,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
        progress: ProgressArg = True,
        **options,
    ) -> ConceptRef:
        """Trains `concept` (a name) from the photos in `folder`, starting from
        `category` (e.g. "dog"), and waits for the job; returns the concept written.

        `options` are `training_spec`'s (e.g. `resolution`, `stage1_steps`,
        `stage2_steps`, `batch_size`, `seed`, `version`). `progress` is a callable
        receiving `Progress`, True for a text bar on stderr, or None. Raises
        `JobFailed` when the job fails or is cancelled, `CoregError` when `timeout`
        seconds pass first.
        """
        job = self.submit_folder(folder, concept, category, request_id=request_id, **options)
        final = self.wait(job.id, timeout=timeout, progress=progress)
        return ConceptRef.from_pb(final.concept)

    def job(self, job_id: str):
        """The training job `job_id` as it is now."""
        return self.trainer_stub.GetTrainingJob(
            trainer_pb2.GetTrainingJobRequest(id=job_id),
            metadata=self.metadata,
            timeout=self.call_timeout,
        )

    def cancel(self, job_id: str):
        """Cancels the training job `job_id`; returns it."""
        return self.trainer_stub.CancelTrainingJob(
            trainer_pb2.CancelTrainingJobRequest(id=job_id),
            metadata=self.metadata,
            timeout=self.call_timeout,
        )

    def wait(
        self,
        job_id: str,
        timeout: Optional[float] = None,
        progress: ProgressArg = True,
    ):
        """Watches the training job `job_id` until it ends; returns the final
        `TrainingJob` when it SUCCEEDED (its `concept` names what it wrote).

        Raises `JobFailed` when it ends FAILED or CANCELLED, and `CoregError` when
        `timeout` seconds pass first (the job goes on). A watch the connection drops
        is reopened.
        """
        report = resolve_progress(progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CoregError(f"training job {job_id} did not end within {timeout} s")
                try:
                    final = self._watch_once(job_id, remaining, report)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise CoregError(
                            f"training job {job_id} did not end within {timeout} s"
                        ) from e
                    if e.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    time.sleep(1.0)
                    continue
                if final is None:
                    # The stream ended without a final state: look again.
                    final = self.job(job_id)
                    if final.state not in _FINAL_STATES:
                        continue
                if final.state != trainer_pb2.JOB_STATE_SUCCEEDED:
                    raise JobFailed(final)
                return final
        finally:
            close = getattr(report, "close", None)
            if close is not None:
                close()

    def _watch_once(self, job_id, timeout, report):
        """One WatchTrainingJob stream; the final job, or None if it ended early."""
        events = self.trainer_stub.WatchTrainingJob(
            trainer_pb2.WatchTrainingJobRequest(id=job_id),
            metadata=self.metadata,
            timeout=timeout,
        )
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "job":
                job = event.job
                if job.state in _FINAL_STATES:
                    return job
                if report is not None and job.state == trainer_pb2.JOB_STATE_QUEUED:
                    report(Progress(phase="queued", step=0, total=0))
            elif kind == "progress" and report is not None:
                report(_training_progress(event.progress))
        return None

    # ---- concepts ------------------------------------------------------------------

    def concept(self, concept: ConceptArg):
        """The stored concept's manifest summary (`Concept`)."""
        return self.sampler_stub.GetConcept(
            sampler_pb2.GetConceptRequest(concept=as_concept_ref(concept).to_pb()),
            metadata=self.metadata,
            timeout=self.call_timeout,
        )

    def concepts(self) -> List:
        """The newest version of every stored concept (`Concept`s), all pages."""
        found, token = [], ""
        while True:
            page = self.sampler_stub.ListConcepts(
                sampler_pb2.ListConceptsRequest(page_size=100, page_token=token),
                metadata=self.metadata,
                timeout=self.call_timeout,
            )
            found.extend(page.concepts)
            token = page.next_page_token
            if not token:
                return found

    # ---- generation ----------------------------------------------------------------

    def generate(
        self,
        concept: ConceptArg,
        prompts: Union[str, Sequence[str]],
        out_dir: Union[str, os.PathLike],
        *,
        negative_prompt: str = "",
        images_per_prompt: int = 1,
        seeds: Optional[Sequence[int]] = None,
        steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        width: int = 0,
        height: int = 0,
        scheduler: Optional[str] = None,
        tto_steps: Optional[int] = None,
        tto_learning_rate: Optional[float] = None,
        filename: str = "{concept}-{index:02d}-{seed}.png",
        timeout: Optional[float] = None,
        progress: ProgressArg = True,
    ) -> List[Path]:
        """Generates images of `concept` (a name, `name@version` or `ConceptRef`)
        for `prompts` (each holding `{}` or the concept's token where it goes) and
        writes them as PNGs into `out_dir` (created if missing); returns their paths
        in request order (prompt-major).

        `seeds` gives one seed per image (drawn by the service when None);
        `width`/`height` 0 take the model's size; `scheduler` is one of `SCHEDULERS`;
        `tto_steps` turns on CoRe test-time optimization with that many steps per
        prompt. `filename` is formatted with `concept`, `version`, `index`, `seed`
        and `prompt_index`. A busy replica (RESOURCE_EXHAUSTED) is retried with
        backoff. Raises `CoregError` when an image did not complete.
        """
        ref = as_concept_ref(concept)
        if isinstance(prompts, str):
            prompts = [prompts]
        request = sampler_pb2.GenerateRequest(
            concept=ref.to_pb(),
            prompts=list(prompts),
            negative_prompt=negative_prompt,
            images_per_prompt=images_per_prompt,
            seeds=list(seeds or []),
            width=width,
            height=height,
            destination=sampler_pb2.IMAGE_DESTINATION_INLINE,
        )
        if steps is not None:
            request.steps = steps
        if guidance_scale is not None:
            request.guidance_scale = guidance_scale
        if scheduler is not None:
            if scheduler not in _SCHEDULERS:
                raise ValueError(f"unknown scheduler {scheduler!r}; one of {', '.join(SCHEDULERS)}")
            request.scheduler = _SCHEDULERS[scheduler]
        if tto_steps:
            request.test_time_optimization.enabled = True
            request.test_time_optimization.steps = tto_steps
            if tto_learning_rate is not None:
                request.test_time_optimization.learning_rate = tto_learning_rate

        report = resolve_progress(progress)
        try:
            images = self._generate_with_retries(request, timeout, report)
        finally:
            close = getattr(report, "close", None)
            if close is not None:
                close()

        failed = [
            f"image {image.index} ({sampler_pb2.FinishReason.Name(image.finish_reason)})"
            for image in images
            if image.finish_reason != sampler_pb2.FINISH_REASON_COMPLETED
            or image.WhichOneof("image") != "png"
        ]
        if failed:
            raise CoregError("the sampler did not complete " + ", ".join(failed))

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        per_prompt = max(images_per_prompt, 1)
        paths = []
        for image in sorted(images, key=lambda image: image.index):
            path = out_dir / filename.format(
                concept=ref.name,
                version=ref.version or "latest",
                index=image.index,
                seed=image.seed,
                prompt_index=image.index // per_prompt,
            )
            path.write_bytes(image.png)
            paths.append(path)
        return paths

    def _generate_with_retries(self, request, timeout, report):
        delay = 0.5
        for attempt in range(BUSY_RETRIES + 1):
            try:
                return self._generate_once(request, timeout, report)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == BUSY_RETRIES:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    def _generate_once(self, request, timeout, report):
        """One Generate stream; its images. Progress is reported over the whole
        request: the service counts denoising steps per prompt, so a step count that
        goes back marks the next prompt."""
        images = []
        prompts = max(len(request.prompts), 1)
        tto = request.test_time_optimization.enabled
        optimized, run, last_step = 0, 0, -1
        for event in self.sampler_stub.Generate(
            request, metadata=self.metadata, timeout=timeout
        ):
            kind = event.WhichOneof("event")
            if kind == "image":
                images.append(event.image)
            elif kind == "progress" and report is not None:
                p = event.progress
                if tto and p.optimized_prompts > optimized:
                    optimized = p.optimized_prompts
                    report(Progress("optimizing", optimized, prompts))
                if not p.total_steps:
                    continue
                if p.step < last_step:
                    run = min(run + 1, prompts - 1)
                last_step = p.step
                has_timing = p.HasField("timing")
                report(
                    Progress(
                        "denoising",
                        run * p.total_steps + p.step,
                        prompts * p.total_steps,
                        _seconds(p.timing.step_time) if has_timing else None,
                        _seconds(p.timing.eta) if has_timing and p.timing.HasField("eta") else None,
                    )
                )
        return images


_FINAL_STATES = (
    trainer_pb2.JOB_STATE_SUCCEEDED,
    trainer_pb2.JOB_STATE_FAILED,
    trainer_pb2.JOB_STATE_CANCELLED,
)
