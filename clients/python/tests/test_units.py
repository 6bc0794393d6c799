"""The helper's parts that need no server: folder scanning, progress, concept
references, the CLI's arguments, and that the committed stubs match proto/."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import coreg_client
from coreg_client import Client, ConceptRef, Progress, TextProgressBar, format_bar, scan_images
from coreg_client.cli import build_parser, main
from coreg_client.progress import format_duration

from conftest import write_photo

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REPO_ROOT = PACKAGE_ROOT.parent.parent


# ---- folder scanning ------------------------------------------------------------------


def test_scan_finds_photos_in_name_order_and_skips_the_rest(photos):
    (photos / ".hidden.png").write_bytes(b"x")
    (photos / "sub").mkdir()
    write_photo(photos / "sub" / "3.png", 8, 8)
    assert [p.name for p in scan_images(photos)] == ["0.png", "1.PNG", "2.jpg"]


def test_scan_of_a_missing_folder_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        scan_images(tmp_path / "nope")


def test_scan_of_a_file_fails(tmp_path):
    path = write_photo(tmp_path / "a.png", 8, 8)
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        scan_images(path)


def test_scan_of_a_folder_without_photos_fails(tmp_path):
    (tmp_path / "readme.md").write_text("hello")
    with pytest.raises(ValueError, match="no PNG, JPEG or WebP photos"):
        scan_images(tmp_path)


def test_scan_refuses_more_photos_than_a_job_takes(tmp_path):
    for i in range(21):
        write_photo(tmp_path / f"{i:02d}.png", 8, 8)
    with pytest.raises(ValueError, match="at most 20"):
        scan_images(tmp_path)


def test_scan_refuses_an_empty_photo(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        scan_images(tmp_path)


def test_scan_refuses_a_photo_over_20_mib(tmp_path):
    with open(tmp_path / "big.jpg", "wb") as f:
        f.truncate((20 << 20) + 1)
    with pytest.raises(ValueError, match="at most 20 MiB"):
        scan_images(tmp_path)


# ---- progress -------------------------------------------------------------------------


def test_format_bar_shows_label_bar_steps_pace_eta_and_loss():
    line = format_bar(
        Progress("embedding", 6, 24, step_seconds=0.5, eta_seconds=9, losses={"total": 0.1234}),
        width=8,
    )
    assert line == "stage 1 (embedding) [##------]  6/24  0.50 s/step  eta 9s  loss 0.1234"


def test_format_bar_at_the_end_has_no_eta_and_a_full_bar():
    line = format_bar(Progress("denoising", 4, 4, eta_seconds=0.0), width=4)
    assert line == "denoising [####] 4/4"


def test_format_bar_clamps_steps_past_the_total():
    assert format_bar(Progress("unet", 9, 4), width=4) == "stage 2 (U-Net) [####] 4/4"


def test_format_bar_without_a_total_is_the_label():
    assert format_bar(Progress("queued", 0, 0)) == "queued"


@pytest.mark.parametrize(
    "seconds, text", [(0, "0s"), (42.4, "42s"), (185, "3m05s"), (3720, "1h02m")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_the_text_bar_in_a_log_writes_a_line_per_tenth_and_phase():
    stream = io.StringIO()
    bar = TextProgressBar(stream, width=10)
    for step in range(1, 101):
        bar(Progress("embedding", step, 100))
    for step in range(1, 3):
        bar(Progress("unet", step, 2))
    bar.close()
    lines = stream.getvalue().splitlines()
    # Step 1 (a new phase), then steps 10, 20, … 100; stage 2's two steps.
    assert len(lines) == 11 + 2, lines
    assert lines[0] == "stage 1 (embedding) [----------]   1/100"
    assert lines[1] == "stage 1 (embedding) [#---------]  10/100"
    assert lines[10] == "stage 1 (embedding) [##########] 100/100"
    assert lines[-1] == "stage 2 (U-Net) [##########] 2/2"


def test_the_text_bar_on_a_terminal_redraws_in_place():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = TextProgressBar(stream, width=4)
    bar(Progress("denoising", 1, 2))
    bar(Progress("denoising", 2, 2))
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 2
    assert text.endswith("denoising [####] 2/2\x1b[K\n")


# ---- concept references and arguments ---------------------------------------------------


def test_concept_refs_parse_and_print():
    assert ConceptRef.parse("rex") == ConceptRef("rex", "")
    assert ConceptRef.parse("rex@j123") == ConceptRef("rex", "j123")
    assert str(ConceptRef("rex", "j123")) == "rex@j123"
    assert ConceptRef.from_pb(ConceptRef("a", "b").to_pb()) == ConceptRef("a", "b")
    for bad in ["", "Rex", "../x", "-rex"]:
        with pytest.raises(ValueError):
            ConceptRef.parse(bad)


def test_training_spec_sets_only_what_is_given():
    with Client(trainer="127.0.0.1:1") as client:
        spec = client.training_spec(
            [b"png", "uploads/rex/1.jpg"],
            "rex",
            "dog",
            resolution=64,
            stage1_steps=6,
            batch_size=2,
            stage1={"rescale_until": 4},
        )
    assert [i.WhichOneof("source") for i in spec.images] == ["data", "object_key"]
    assert spec.resolution == 64
    assert (spec.stage1.steps, spec.stage1.batch_size, spec.stage1.rescale_until) == (6, 2, 4)
    assert spec.stage2.batch_size == 2
    assert not spec.stage2.HasField("steps")
    assert not spec.HasField("checkpoint_every")


def test_training_spec_refuses_a_bad_concept_name():
    with Client(trainer="127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="not a concept name"):
            client.training_spec([b"x"], "Rex!", "dog")


def test_a_client_needs_an_address():
    with pytest.raises(ValueError):
        Client()
    with Client(trainer="127.0.0.1:1") as client:
        with pytest.raises(coreg_client.CoregError, match="no sampler"):
            client.sampler_stub


def test_the_cli_parses_generate_options():
    args = build_parser().parse_args(
        ["generate", "--sampler", "h:1", "--concept", "rex@v1", "--out", "o",
         "--seed", "3", "--seed", "4", "--steps", "4", "a {}", "b {}"]
    )
    assert args.concept == ConceptRef("rex", "v1")
    assert args.seeds == [3, 4]
    assert args.prompts == ["a {}", "b {}"]


def test_the_cli_without_an_address_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv("COREG_SAMPLER_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--concept", "rex", "--out", "o", "a {}"])
    assert exit.value.code == 2
    assert "COREG_SAMPLER_ADDRESS" in capsys.readouterr().err


def test_the_cli_reports_a_bad_folder_without_a_traceback(tmp_path, capsys):
    code = main(["train", "--trainer", "127.0.0.1:1", "--concept", "rex",
                 "--category", "dog", str(tmp_path / "nope")])
    assert code == 2
    assert "no folder" in capsys.readouterr().err


# ---- the generated stubs ------------------------------------------------------------


def test_the_stubs_import_inside_the_package():
    from coreg_client._proto.coreg.v1 import sampler_pb2, sampler_pb2_grpc, trainer_pb2

    assert trainer_pb2.DESCRIPTOR.name == "coreg/v1/trainer.proto"
    assert trainer_pb2.DESCRIPTOR.package == "coreg.v1"
    assert hasattr(sampler_pb2_grpc, "SamplerServiceStub")
    # Their imports of each other were rewritten to the package's path.
    common = sampler_pb2.coreg_dot_v1_dot_common__pb2
    assert common.__name__ == "coreg_client._proto.coreg.v1.common_pb2"


def test_the_committed_stubs_are_current_with_proto():
    """generate.sh --check regenerates into a temp dir and diffs. Needs grpcio-tools
    (in the repository's .venv); skipped where the package is installed alone."""
    pytest.importorskip("grpc_tools.protoc")
    script = PACKAGE_ROOT / "generate.sh"
    if not (REPO_ROOT / "proto" / "coreg" / "v1").is_dir():
        pytest.skip("not in the coreg repository")
    result = subprocess.run(
        ["bash", str(script), "--check"],
        env={**os.environ, "COREG_PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
