"""The helper against real services: train a concept from a folder of photos on
`coreg-trainer`, then generate images of it to files on `coreg-sampler`, through the
API and through the command line.

Needs a trainer and a sampler sharing one object store, their addresses in
COREG_TRAINER_ADDRESS and COREG_SAMPLER_ADDRESS (skipped otherwise). The schedule
is tiny (64 px, a few steps) for the test model `coreg model init --size tiny`;
tests/e2e/tests/integration/python_client.rs starts such services and runs these tests.
"""

import os
import subprocess
import sys
import uuid

import grpc
import pytest
from PIL import Image

from coreg_client import Client, ConceptRef, Progress

SIDE = 64
# A job on the tiny model on a CPU takes seconds; the margin is for a loaded machine.
JOB_TIMEOUT_S = 600
GENERATE_TIMEOUT_S = 300
TRAINING = dict(
    resolution=SIDE,
    stage1_steps=6,
    stage2_steps=2,
    batch_size=2,
    checkpoint_every=2,
    stage1={"rescale_record_at": 2, "rescale_until": 4},
)


def assert_png(path, size):
    """`path` is a PNG of `size` that decodes."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.size == size, f"{path} is {image.size}, not {size}"


@pytest.fixture(scope="module")
def client(addresses):
    trainer, sampler = addresses
    with Client(
        trainer=trainer, sampler=sampler, token=os.environ.get("COREG_TOKEN")
    ) as client:
        yield client


@pytest.fixture(scope="module")
def trained(client, tmp_path_factory):
    """Trains concept `pyclient` from a folder once for the module; returns the
    concept, the progress events seen, and the folder."""
    from conftest import write_photo

    folder = tmp_path_factory.mktemp("photos")
    write_photo(folder / "0.png", 80, 72, 0)
    write_photo(folder / "1.png", 88, 72, 40)
    write_photo(folder / "2.jpg", 96, 72, 80, fmt="JPEG")
    events = []
    concept = client.train_from_folder(
        folder,
        "pyclient",
        "dog",
        request_id=f"pyclient-{uuid.uuid4().hex[:12]}",
        timeout=JOB_TIMEOUT_S,
        progress=events.append,
        **TRAINING,
    )
    return concept, events, folder


def test_train_from_folder_writes_the_concept(client, trained):
    concept, events, _ = trained
    assert isinstance(concept, ConceptRef)
    assert concept.name == "pyclient"
    assert concept.version, "a job with no version asked writes the job id as version"
    # The stages' steps were reported, each within its total.
    phases = {e.phase for e in events}
    assert {"embedding", "unet"} <= phases, phases
    for event in events:
        assert isinstance(event, Progress)
        assert event.total == 0 or 0 <= event.step <= event.total, event
    assert any(e.phase == "embedding" and e.step == e.total == 6 for e in events), events
    # The sampler sees it with the category it was trained from.
    stored = client.concept(concept)
    assert stored.ref.name == "pyclient"
    assert stored.ref.version == concept.version
    assert stored.category == "dog"
    assert stored.token == "<pyclient>"
    assert "pyclient" in [c.ref.name for c in client.concepts()]


def test_wait_on_an_ended_job_returns_it(client, trained):
    concept, _, _ = trained
    # The version is the job id: waiting on the ended job answers at once.
    job = client.wait(concept.version, timeout=60, progress=False)
    assert job.id == concept.version
    assert ConceptRef.from_pb(job.concept) == concept


def test_generate_writes_pngs_of_the_requested_size(client, trained, tmp_path):
    concept, _, _ = trained
    events = []
    paths = client.generate(
        concept,
        ["a photo of {}", "{} on the beach"],
        tmp_path / "out",
        seeds=[11, 12],
        steps=4,
        width=SIDE,
        height=SIDE,
        timeout=GENERATE_TIMEOUT_S,
        progress=events.append,
    )
    assert [p.name for p in paths] == [
        "pyclient-00-11.png",
        "pyclient-01-12.png",
    ]
    for path in paths:
        assert path.parent == tmp_path / "out"
        assert_png(path, (SIDE, SIDE))
    assert events and all(e.phase == "denoising" for e in events), events
    assert events[-1].step == events[-1].total == 8, events[-1]
    # The same seeds give the same images.
    again = client.generate(
        concept.name,
        ["a photo of {}", "{} on the beach"],
        tmp_path / "again",
        seeds=[11, 12],
        steps=4,
        width=SIDE,
        height=SIDE,
        timeout=GENERATE_TIMEOUT_S,
        progress=False,
    )
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_generate_with_test_time_optimization(client, trained, tmp_path):
    concept, _, _ = trained
    events = []
    paths = client.generate(
        concept,
        "a photo of {}",
        tmp_path,
        seeds=[5],
        steps=2,
        width=SIDE,
        height=SIDE,
        tto_steps=2,
        timeout=GENERATE_TIMEOUT_S,
        progress=events.append,
        filename="tto-{index}.png",
    )
    assert paths == [tmp_path / "tto-0.png"]
    assert_png(paths[0], (SIDE, SIDE))
    assert Progress("optimizing", 1, 1) in events, events


def test_the_cli_generates_to_files_and_prints_their_paths(addresses, trained, tmp_path):
    trainer, sampler = addresses
    concept, _, _ = trained
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "coreg_client", "generate", "--sampler", sampler,
         "--concept", str(concept), "--out", str(out), "--steps", "2",
         "--width", str(SIDE), "--height", str(SIDE), "--seed", "7",
         "a photo of {}"],
        capture_output=True,
        text=True,
        timeout=GENERATE_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout.split()
    assert printed == [str(out / "pyclient-00-7.png")]
    assert_png(out / "pyclient-00-7.png", (SIDE, SIDE))
    assert "denoising [" in result.stderr


def test_the_cli_train_reports_a_refusal(addresses, trained):
    trainer, _ = addresses
    _, _, folder = trained
    # A category that is not one CLIP token is refused before any training.
    result = subprocess.run(
        [sys.executable, "-m", "coreg_client", "train", "--trainer", trainer, "-q",
         "--concept", "pyclient-bad", "--category", "", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "INVALID_ARGUMENT" in result.stderr, result.stderr


def test_generate_of_an_unknown_concept_is_not_found(client, tmp_path):
    with pytest.raises(grpc.RpcError) as e:
        client.generate("no-such-concept", "a photo of {}", tmp_path, steps=1, progress=False)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert not list(tmp_path.iterdir())
