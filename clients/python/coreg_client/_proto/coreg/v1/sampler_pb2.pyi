import datetime

from coreg_client._proto.coreg.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scheduler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULER_UNSPECIFIED: _ClassVar[Scheduler]
    SCHEDULER_DPM_SOLVER_MULTISTEP: _ClassVar[Scheduler]
    SCHEDULER_DDIM: _ClassVar[Scheduler]
    SCHEDULER_EULER_DISCRETE: _ClassVar[Scheduler]

class ImageDestination(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_DESTINATION_UNSPECIFIED: _ClassVar[ImageDestination]
    IMAGE_DESTINATION_INLINE: _ClassVar[ImageDestination]
    IMAGE_DESTINATION_STORE: _ClassVar[ImageDestination]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_COMPLETED: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_NON_FINITE: _ClassVar[FinishReason]
SCHEDULER_UNSPECIFIED: Scheduler
SCHEDULER_DPM_SOLVER_MULTISTEP: Scheduler
SCHEDULER_DDIM: Scheduler
SCHEDULER_EULER_DISCRETE: Scheduler
IMAGE_DESTINATION_UNSPECIFIED: ImageDestination
IMAGE_DESTINATION_INLINE: ImageDestination
IMAGE_DESTINATION_STORE: ImageDestination
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_COMPLETED: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_NON_FINITE: FinishReason

class TestTimeOptimization(_message.Message):
    __slots__ = ("enabled", "steps", "learning_rate")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    steps: int
    learning_rate: float
    def __init__(self, enabled: _Optional[bool] = ..., steps: _Optional[int] = ..., learning_rate: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("concept", "prompts", "negative_prompt", "images_per_prompt", "seeds", "steps", "guidance_scale", "width", "height", "scheduler", "test_time_optimization", "destination")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    TEST_TIME_OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    concept: _common_pb2.ConceptRef
    prompts: _containers.RepeatedScalarFieldContainer[str]
    negative_prompt: str
    images_per_prompt: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: Scheduler
    test_time_optimization: TestTimeOptimization
    destination: ImageDestination
    def __init__(self, concept: _Optional[_Union[_common_pb2.ConceptRef, _Mapping]] = ..., prompts: _Optional[_Iterable[str]] = ..., negative_prompt: _Optional[str] = ..., images_per_prompt: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., scheduler: _Optional[_Union[Scheduler, str]] = ..., test_time_optimization: _Optional[_Union[TestTimeOptimization, _Mapping]] = ..., destination: _Optional[_Union[ImageDestination, str]] = ...) -> None: ...

class GenerationProgress(_message.Message):
    __slots__ = ("optimized_prompts", "step", "total_steps", "timing")
    OPTIMIZED_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    optimized_prompts: int
    step: int
    total_steps: int
    timing: _common_pb2.Timing
    def __init__(self, optimized_prompts: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("index", "prompt", "seed", "png", "uri", "finish_reason", "width", "height")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    index: int
    prompt: str
    seed: int
    png: bytes
    uri: str
    finish_reason: FinishReason
    width: int
    height: int
    def __init__(self, index: _Optional[int] = ..., prompt: _Optional[str] = ..., seed: _Optional[int] = ..., png: _Optional[bytes] = ..., uri: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("progress", "image")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    progress: GenerationProgress
    image: GeneratedImage
    def __init__(self, progress: _Optional[_Union[GenerationProgress, _Mapping]] = ..., image: _Optional[_Union[GeneratedImage, _Mapping]] = ...) -> None: ...

class ListConceptsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListConceptsResponse(_message.Message):
    __slots__ = ("concepts", "next_page_token")
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    concepts: _containers.RepeatedCompositeFieldContainer[Concept]
    next_page_token: str
    def __init__(self, concepts: _Optional[_Iterable[_Union[Concept, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetConceptRequest(_message.Message):
    __slots__ = ("concept",)
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    concept: _common_pb2.ConceptRef
    def __init__(self, concept: _Optional[_Union[_common_pb2.ConceptRef, _Mapping]] = ...) -> None: ...

class Concept(_message.Message):
    __slots__ = ("ref", "token", "category", "base_model", "base_model_sha256", "versions", "create_time", "software_version", "hyper_parameters_json")
    REF_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    HYPER_PARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    ref: _common_pb2.ConceptRef
    token: str
    category: str
    base_model: str
    base_model_sha256: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    software_version: str
    hyper_parameters_json: str
    def __init__(self, ref: _Optional[_Union[_common_pb2.ConceptRef, _Mapping]] = ..., token: _Optional[str] = ..., category: _Optional[str] = ..., base_model: _Optional[str] = ..., base_model_sha256: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., software_version: _Optional[str] = ..., hyper_parameters_json: _Optional[str] = ...) -> None: ...
