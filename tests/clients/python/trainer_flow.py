#!/usr/bin/env python3
"""The trainer service's submit/watch/get/list/cancel flow, as a Python user runs it.

A Rust integration test starts a real `coreg-trainer serve` on loopback with the tiny
model, generates the Python stubs (`generate_stubs.sh`) and runs this script against
it. The script talks to the server only through the stubs generated from
`proto/coreg/v1/*.proto` and grpcio, so it proves the contract works for a client in
another language, not just for the Rust types it was generated into.

Exit status: 0 when every check passed (a JSON summary is written to `--out`), 1 when
a check failed or the server answered a call with an unexpected error (the message
says which), 2 for bad command-line arguments.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HEALTH_TIMEOUT_S = 120.0
# How long the long job may stay queued before it is cancelled anyway.
START_TIMEOUT_S = 60.0
CANCEL_TIMEOUT_S = 120.0
# How long a unary call may take; the server answers these from the store.
CALL_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.25
# Guards the paging loop against a server that keeps handing out tokens.
MAX_PAGES = 10_000
# A well-formed job id (the shape of a request-id job id) that no request maps to.
UNKNOWN_JOB_ID = "r" + "0" * 24


class FlowError(Exception):
    """A check failed: the server broke its contract."""


def check(condition, message):
    """Raises FlowError with `message` unless `condition` holds."""
    if not condition:
        raise FlowError(message)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Run the trainer service's client flow against a live server."
    )
    parser.add_argument("--address", required=True, help="the server, host:port")
    parser.add_argument(
        "--stubs",
        required=True,
        type=Path,
        help="the directory generate_stubs.sh wrote (holds the `coreg` package)",
    )
    parser.add_argument(
        "--images",
        required=True,
        nargs="+",
        type=Path,
        help="training photos sent inline",
    )
    parser.add_argument(
        "--token", help="bearer token, sent as `authorization: Bearer TOKEN`"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="where the JSON summary goes"
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=600.0,
        help="seconds the first job may take to finish (default 600)",
    )
    return parser.parse_args(argv)


def import_stubs(stubs_dir):
    """Imports the generated modules from `stubs_dir` (not installed anywhere)."""
    check(
        (stubs_dir / "coreg" / "v1" / "trainer_pb2.py").is_file(),
        f"no generated stubs under {stubs_dir} (run tests/clients/python/generate_stubs.sh)",
    )
    sys.path.insert(0, str(stubs_dir.resolve()))
    from coreg.v1 import trainer_pb2, trainer_pb2_grpc

    return trainer_pb2, trainer_pb2_grpc


class Flow:
    """The checks, in order, sharing one channel and the stubs."""

    def __init__(self, channel, pb, pb_grpc, token, job_timeout):
        self.pb = pb
        self.channel = channel
        self.trainer = pb_grpc.TrainerServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.token = token
        self.job_timeout = job_timeout

    def state_name(self, state):
        return self.pb.JobState.Name(state)

    def wait_until_serving(self):
        """Health's overall status reaches SERVING: the server loaded and warmed the
        base model. Sent without the token, so it also shows health is exempt from
        authentication."""
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                reply = health.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as e:
                # UNAVAILABLE while the server is still binding its port.
                last = f"{e.code().name}: {e.details()}"
            time.sleep(POLL_INTERVAL_S)
        raise FlowError(
            f"health did not report SERVING within {HEALTH_TIMEOUT_S:.0f} s (last: {last})"
        )

    def check_token_required(self):
        """With a token configured, a call without it is UNAUTHENTICATED."""
        if not self.token:
            return
        code, details = self.expect_error(
            self.trainer.GetTrainingJob,
            self.pb.GetTrainingJobRequest(id=UNKNOWN_JOB_ID),
            metadata=(),
        )
        check(
            code == grpc.StatusCode.UNAUTHENTICATED,
            f"a call without the token gave {code.name} ({details}), not UNAUTHENTICATED",
        )

    def spec(self, images, concept_name, stage1_steps):
        """A spec small enough for the tiny model on a CPU."""
        pb = self.pb
        return pb.TrainingJobSpec(
            concept_name=concept_name,
            category="dog",
            images=[pb.TrainingImage(data=data) for data in images],
            seed=0,
            resolution=64,
            stage1=pb.Stage1Parameters(
                steps=stage1_steps,
                batch_size=2,
                rescale_record_at=2,
                rescale_until=4,
            ),
            stage2=pb.Stage2Parameters(steps=2, batch_size=2),
            checkpoint_every=2,
        )

    def create(self, request_id, spec):
        return self.trainer.CreateTrainingJob(
            self.pb.CreateTrainingJobRequest(request_id=request_id, spec=spec),
            metadata=self.metadata,
            timeout=CALL_TIMEOUT_S,
        )

    def get(self, job_id):
        return self.trainer.GetTrainingJob(
            self.pb.GetTrainingJobRequest(id=job_id),
            metadata=self.metadata,
            timeout=CALL_TIMEOUT_S,
        )

    def watch(self, job_id, timeout):
        return self.trainer.WatchTrainingJob(
            self.pb.WatchTrainingJobRequest(id=job_id),
            metadata=self.metadata,
            timeout=timeout,
        )

    def expect_error(self, method, request, metadata=None):
        """Calls `method`, which must fail; returns the status code and details."""
        try:
            method(
                request,
                metadata=self.metadata if metadata is None else metadata,
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        raise FlowError(f"{request.DESCRIPTOR.name} succeeded but should have failed")

    def create_job(self, images):
        """The job is accepted: queued with the spec as sent, its inline images
        replaced by the store keys they were written under."""
        job = self.create("py-flow-1", self.spec(images, "pyrex", 6))
        check(job.id, "CreateTrainingJob returned a job without an id")
        check(
            job.spec.concept_name == "pyrex",
            f"the created job's concept_name is {job.spec.concept_name!r}, not 'pyrex'",
        )
        check(
            len(job.spec.images) == len(images),
            f"the created job holds {len(job.spec.images)} images, {len(images)} were sent",
        )
        for i, image in enumerate(job.spec.images):
            check(
                image.WhichOneof("source") == "object_key",
                f"spec.images[{i}] was not replaced by its store key",
            )
        return job

    def create_again_is_idempotent(self, images, job_id):
        """A retry with the same request_id returns the first job, creating nothing."""
        again = self.create("py-flow-1", self.spec(images, "pyrex", 6))
        check(
            again.id == job_id,
            f"the same request_id gave job {job_id!r}, then {again.id!r}",
        )

    def watch_to_success(self, events, job_id):
        """The watch stream opens with the job, reports steps, and ends with the
        final state: SUCCEEDED, with the concept written under the job's name and
        (no version requested) the job id as its version."""
        try:
            collected = list(events)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise FlowError(
                    f"job {job_id} did not finish within {self.job_timeout:.0f} s"
                ) from e
            raise
        check(collected, f"the watch of {job_id} ended without any event")
        kinds = [event.WhichOneof("event") for event in collected]
        check(kinds[0] == "job", f"the watch's first event is {kinds[0]!r}, not 'job'")
        progress = [e.progress for e in collected if e.WhichOneof("event") == "progress"]
        check(progress, "the watch sent no progress event")
        for p in progress:
            check(
                p.total_steps > 0,
                f"a progress event has total_steps {p.total_steps}",
            )
            check(
                p.step <= p.total_steps,
                f"a progress event has step {p.step} of {p.total_steps}",
            )
        check(kinds[-1] == "job", f"the watch's last event is {kinds[-1]!r}, not 'job'")
        final = collected[-1].job
        check(
            final.state == self.pb.JOB_STATE_SUCCEEDED,
            f"job {job_id} ended {self.state_name(final.state)} (error: {final.error!r})",
        )
        check(
            final.concept.name == "pyrex",
            f"the job wrote concept {final.concept.name!r}, not 'pyrex'",
        )
        check(
            final.concept.version == job_id,
            f"the concept's version is {final.concept.version!r}, not the job id",
        )
        return len(progress)

    def get_succeeded(self, job_id):
        """Get agrees with the watch and carries the job's creation time."""
        job = self.get(job_id)
        check(job.id == job_id, f"GetTrainingJob({job_id}) returned job {job.id!r}")
        check(
            job.state == self.pb.JOB_STATE_SUCCEEDED,
            f"GetTrainingJob says {self.state_name(job.state)}, the watch said SUCCEEDED",
        )
        check(
            job.HasField("create_time") and job.create_time.seconds > 0,
            "the job has no create_time",
        )
        return job

    def list_finds(self, newer_id, older_id):
        """Paging one job at a time visits every job once and reaches the last page
        (empty next_page_token); both jobs are among them, the newer one first.
        With two jobs at least, this crosses a page boundary."""
        seen = []
        token = ""
        for _ in range(MAX_PAGES):
            page = self.trainer.ListTrainingJobs(
                self.pb.ListTrainingJobsRequest(page_size=1, page_token=token),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT_S,
            )
            check(
                len(page.jobs) <= 1,
                f"a page of page_size 1 held {len(page.jobs)} jobs",
            )
            seen.extend(job.id for job in page.jobs)
            token = page.next_page_token
            if not token:
                break
        else:
            raise FlowError(f"ListTrainingJobs still had a next page after {MAX_PAGES}")
        check(len(seen) == len(set(seen)), f"paging returned a job twice: {seen}")
        for job_id in (newer_id, older_id):
            check(job_id in seen, f"paging through {len(seen)} jobs did not find {job_id}")
        check(
            seen.index(newer_id) < seen.index(older_id),
            f"job {newer_id} was listed after the older {older_id} (jobs list newest first)",
        )
        return len(seen)

    def wait_until_started(self, job_id):
        """Polls until the job runs, so the cancel below stops a running job; a job
        still queued when time is up is cancelled as it is. Returns its state."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            state = self.get(job_id).state
            check(
                state in (self.pb.JOB_STATE_QUEUED, self.pb.JOB_STATE_RUNNING),
                f"the long job {job_id} is {self.state_name(state)} before it was cancelled",
            )
            if state == self.pb.JOB_STATE_RUNNING or time.monotonic() > deadline:
                return state
            time.sleep(POLL_INTERVAL_S)

    def cancel_ends_cancelled(self, job_id):
        """Cancel stops the job: its watch ends CANCELLED, no concept is written,
        and a second cancel returns the ended job unchanged."""
        request = self.pb.CancelTrainingJobRequest(id=job_id)
        cancelled = self.trainer.CancelTrainingJob(
            request, metadata=self.metadata, timeout=CALL_TIMEOUT_S
        )
        check(
            cancelled.state
            in (self.pb.JOB_STATE_RUNNING, self.pb.JOB_STATE_CANCELLED),
            f"CancelTrainingJob returned the job {self.state_name(cancelled.state)}",
        )
        try:
            events = list(self.watch(job_id, CANCEL_TIMEOUT_S))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise FlowError(
                    f"job {job_id} did not end within {CANCEL_TIMEOUT_S:.0f} s of its cancel"
                ) from e
            raise
        check(
            events and events[-1].WhichOneof("event") == "job",
            "the cancelled job's watch did not end with a job event",
        )
        final = events[-1].job
        check(
            final.state == self.pb.JOB_STATE_CANCELLED,
            f"the cancelled job ended {self.state_name(final.state)}",
        )
        check(
            not final.concept.name,
            f"the cancelled job wrote concept {final.concept.name!r}",
        )
        again = self.trainer.CancelTrainingJob(
            request, metadata=self.metadata, timeout=CALL_TIMEOUT_S
        )
        check(
            again.state == self.pb.JOB_STATE_CANCELLED,
            f"cancelling the ended job changed it to {self.state_name(again.state)}",
        )
        return final

    def unknown_job_not_found(self):
        """An id no job has is NOT_FOUND, not an empty job."""
        code, details = self.expect_error(
            self.trainer.GetTrainingJob, self.pb.GetTrainingJobRequest(id=UNKNOWN_JOB_ID)
        )
        check(
            code == grpc.StatusCode.NOT_FOUND,
            f"GetTrainingJob of an unknown id gave {code.name} ({details}), not NOT_FOUND",
        )

    def no_images_invalid(self):
        """A spec without images is INVALID_ARGUMENT, naming the field at fault."""
        spec = self.spec([], "pyrex", 6)
        code, details = self.expect_error(
            self.trainer.CreateTrainingJob,
            self.pb.CreateTrainingJobRequest(spec=spec),
        )
        check(
            code == grpc.StatusCode.INVALID_ARGUMENT,
            f"a create with no images gave {code.name} ({details}), not INVALID_ARGUMENT",
        )
        check("images" in details, f"the refusal does not name `images`: {details!r}")
        return details

    def run(self, images):
        self.wait_until_serving()
        self.check_token_required()

        job = self.create_job(images)
        # Opened before the retry so that a fast job's steps are not over before the
        # watch starts: grpcio starts the call here and buffers its events until they
        # are read.
        events = self.watch(job.id, self.job_timeout)
        self.create_again_is_idempotent(images, job.id)
        progress_events = self.watch_to_success(events, job.id)
        done = self.get_succeeded(job.id)

        long_spec = self.spec(images, "pyrex-cancel", 100_000)
        long_job = self.create("py-flow-2", long_spec)
        state_at_cancel = self.wait_until_started(long_job.id)
        cancelled = self.cancel_ends_cancelled(long_job.id)
        listed = self.list_finds(long_job.id, job.id)

        self.unknown_job_not_found()
        refusal = self.no_images_invalid()

        return {
            "job": {
                "id": done.id,
                "state": self.state_name(done.state),
                "concept": {"name": done.concept.name, "version": done.concept.version},
                "progress_events": progress_events,
            },
            "listed_jobs": listed,
            "cancelled_job": {
                "id": cancelled.id,
                "state_at_cancel": self.state_name(state_at_cancel),
                "state": self.state_name(cancelled.state),
            },
            "no_images_error": refusal,
        }


def main(argv=None):
    args = parse_args(argv)
    images = []
    for path in args.images:
        try:
            images.append(path.read_bytes())
        except OSError as e:
            print(f"trainer_flow: cannot read image {path}: {e}", file=sys.stderr)
            return 2
    try:
        pb, pb_grpc = import_stubs(args.stubs)
        with grpc.insecure_channel(args.address) as channel:
            flow = Flow(channel, pb, pb_grpc, args.token, args.job_timeout)
            summary = flow.run(images)
    except FlowError as e:
        print(f"trainer_flow: FAILED: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(
            f"trainer_flow: FAILED: unexpected {e.code().name} from the server: {e.details()}",
            file=sys.stderr,
        )
        return 1
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
