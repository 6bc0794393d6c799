"""Shared by the package's tests: photos written on the fly, and the services'
addresses for the flow tests."""

import io
import os

import pytest
from PIL import Image


def write_photo(path, width, height, shade=0, fmt="PNG"):
    """A small patterned photo, saved as `fmt`."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [
            ((x * 3 + shade) % 256, (y * 3) % 256, (x + y + shade) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def photos(tmp_path):
    """A folder of three photos of different sizes (two PNGs, one JPEG) and a file
    that is not a photo, which the scan skips."""
    folder = tmp_path / "photos"
    folder.mkdir()
    write_photo(folder / "0.png", 80, 72, 0)
    write_photo(folder / "1.PNG", 88, 72, 40)
    write_photo(folder / "2.jpg", 96, 72, 80, fmt="JPEG")
    (folder / "notes.txt").write_text("not a photo")
    return folder


@pytest.fixture(scope="session")
def addresses():
    """(trainer, sampler) from COREG_TRAINER_ADDRESS and COREG_SAMPLER_ADDRESS. The
    flow tests are skipped without them, unless COREG_CLIENT_REQUIRE_SERVICES=1 (as
    the Rust test that starts the services sets), which makes their absence a
    failure."""
    trainer = os.environ.get("COREG_TRAINER_ADDRESS")
    sampler = os.environ.get("COREG_SAMPLER_ADDRESS")
    if not (trainer and sampler):
        message = "set COREG_TRAINER_ADDRESS and COREG_SAMPLER_ADDRESS to run the flow tests"
        if os.environ.get("COREG_CLIENT_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return trainer, sampler
