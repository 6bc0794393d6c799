"""A Python client for the coreg services: the gRPC stubs generated from `proto/`
and a thin helper over them.

    from coreg_client import Client

    with Client(trainer="localhost:50051", sampler="localhost:50052") as client:
        concept = client.train_from_folder("photos/rex", "rex", "dog")
        paths = client.generate(concept, ["a photo of {} on the beach"], "out/")

The generated modules are importable as `coreg_client.common_pb2`,
`coreg_client.trainer_pb2`, `coreg_client.trainer_pb2_grpc`,
`coreg_client.sampler_pb2` and `coreg_client.sampler_pb2_grpc` (they live in
`coreg_client._proto.coreg.v1`).
"""

from coreg_client._proto.coreg.v1 import (
    common_pb2,
    sampler_pb2,
    sampler_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from coreg_client.client import (
    SCHEDULERS,
    Client,
    ConceptRef,
    CoregError,
    JobFailed,
    scan_images,
)
from coreg_client.progress import Progress, TextProgressBar, format_bar

__all__ = [
    "SCHEDULERS",
    "Client",
    "ConceptRef",
    "CoregError",
    "JobFailed",
    "Progress",
    "TextProgressBar",
    "common_pb2",
    "format_bar",
    "sampler_pb2",
    "sampler_pb2_grpc",
    "scan_images",
    "trainer_pb2",
    "trainer_pb2_grpc",
]
