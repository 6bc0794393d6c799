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

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]
    PRECISION_FP16: _ClassVar[Precision]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class TrainingStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_STAGE_UNSPECIFIED: _ClassVar[TrainingStage]
    TRAINING_STAGE_EMBEDDING: _ClassVar[TrainingStage]
    TRAINING_STAGE_UNET: _ClassVar[TrainingStage]
    TRAINING_STAGE_WRITING: _ClassVar[TrainingStage]
PRECISION_UNSPECIFIED: Precision
PRECISION_FP32: Precision
PRECISION_BF16: Precision
PRECISION_FP16: Precision
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
TRAINING_STAGE_UNSPECIFIED: TrainingStage
TRAINING_STAGE_EMBEDDING: TrainingStage
TRAINING_STAGE_UNET: TrainingStage
TRAINING_STAGE_WRITING: TrainingStage

class CreateTrainingJobRequest(_message.Message):
    __slots__ = ("request_id", "spec")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: TrainingJobSpec
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[TrainingJobSpec, _Mapping]] = ...) -> None: ...

class TrainingJobSpec(_message.Message):
    __slots__ = ("concept_name", "category", "token", "concept_version", "images", "seed", "resolution", "prompt_set", "custom_prompts", "loss_variant", "stage1", "stage2", "checkpoint_every", "previews")
    CONCEPT_NAME_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SET_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    LOSS_VARIANT_FIELD_NUMBER: _ClassVar[int]
    STAGE1_FIELD_NUMBER: _ClassVar[int]
    STAGE2_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    concept_name: str
    category: str
    token: str
    concept_version: str
    images: _containers.RepeatedCompositeFieldContainer[TrainingImage]
    seed: int
    resolution: int
    prompt_set: _common_pb2.PromptSet
    custom_prompts: _containers.RepeatedScalarFieldContainer[str]
    loss_variant: _common_pb2.LossVariant
    stage1: Stage1Parameters
    stage2: Stage2Parameters
    checkpoint_every: int
    previews: PreviewParameters
    def __init__(self, concept_name: _Optional[str] = ..., category: _Optional[str] = ..., token: _Optional[str] = ..., concept_version: _Optional[str] = ..., images: _Optional[_Iterable[_Union[TrainingImage, _Mapping]]] = ..., seed: _Optional[int] = ..., resolution: _Optional[int] = ..., prompt_set: _Optional[_Union[_common_pb2.PromptSet, str]] = ..., custom_prompts: _Optional[_Iterable[str]] = ..., loss_variant: _Optional[_Union[_common_pb2.LossVariant, str]] = ..., stage1: _Optional[_Union[Stage1Parameters, _Mapping]] = ..., stage2: _Optional[_Union[Stage2Parameters, _Mapping]] = ..., checkpoint_every: _Optional[int] = ..., previews: _Optional[_Union[PreviewParameters, _Mapping]] = ...) -> None: ...

class TrainingImage(_message.Message):
    __slots__ = ("data", "object_key")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KEY_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    object_key: str
    def __init__(self, data: _Optional[bytes] = ..., object_key: _Optional[str] = ...) -> None: ...

class Stage1Parameters(_message.Message):
    __slots__ = ("steps", "batch_size", "learning_rate", "weight_decay", "lambda_embedding", "lambda_attention", "disable_embedding_loss", "disable_attention_loss", "disable_rescaling", "rescale_record_at", "rescale_until")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    DISABLE_EMBEDDING_LOSS_FIELD_NUMBER: _ClassVar[int]
    DISABLE_ATTENTION_LOSS_FIELD_NUMBER: _ClassVar[int]
    DISABLE_RESCALING_FIELD_NUMBER: _ClassVar[int]
    RESCALE_RECORD_AT_FIELD_NUMBER: _ClassVar[int]
    RESCALE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    lambda_embedding: float
    lambda_attention: float
    disable_embedding_loss: bool
    disable_attention_loss: bool
    disable_rescaling: bool
    rescale_record_at: int
    rescale_until: int
    def __init__(self, steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., lambda_embedding: _Optional[float] = ..., lambda_attention: _Optional[float] = ..., disable_embedding_loss: _Optional[bool] = ..., disable_attention_loss: _Optional[bool] = ..., disable_rescaling: _Optional[bool] = ..., rescale_record_at: _Optional[int] = ..., rescale_until: _Optional[int] = ...) -> None: ...

class Stage2Parameters(_message.Message):
    __slots__ = ("steps", "batch_size", "learning_rate", "weight_decay", "gradient_checkpointing", "precision", "delta_rank")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DELTA_RANK_FIELD_NUMBER: _ClassVar[int]
    steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    gradient_checkpointing: bool
    precision: Precision
    delta_rank: int
    def __init__(self, steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., gradient_checkpointing: _Optional[bool] = ..., precision: _Optional[_Union[Precision, str]] = ..., delta_rank: _Optional[int] = ...) -> None: ...

class PreviewParameters(_message.Message):
    __slots__ = ("every", "prompts", "steps")
    EVERY_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    every: int
    prompts: _containers.RepeatedScalarFieldContainer[str]
    steps: int
    def __init__(self, every: _Optional[int] = ..., prompts: _Optional[_Iterable[str]] = ..., steps: _Optional[int] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("id", "spec", "state", "progress", "concept", "error", "create_time", "update_time", "attempts")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: TrainingJobSpec
    state: JobState
    progress: TrainingProgress
    concept: _common_pb2.ConceptRef
    error: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    attempts: int
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[TrainingJobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., concept: _Optional[_Union[_common_pb2.ConceptRef, _Mapping]] = ..., error: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("stage", "step", "total_steps", "losses", "timing")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    stage: TrainingStage
    step: int
    total_steps: int
    losses: _containers.ScalarMap[str, float]
    timing: _common_pb2.Timing
    def __init__(self, stage: _Optional[_Union[TrainingStage, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., losses: _Optional[_Mapping[str, float]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class GetTrainingJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListTrainingJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: JobState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class ListTrainingJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[TrainingJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[TrainingJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelTrainingJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchTrainingJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class TrainingJobEvent(_message.Message):
    __slots__ = ("job", "progress")
    JOB_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    job: TrainingJob
    progress: TrainingProgress
    def __init__(self, job: _Optional[_Union[TrainingJob, _Mapping]] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ...) -> None: ...
