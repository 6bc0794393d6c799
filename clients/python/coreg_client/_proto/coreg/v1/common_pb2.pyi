import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PromptSet(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROMPT_SET_UNSPECIFIED: _ClassVar[PromptSet]
    PROMPT_SET_ANIMATE: _ClassVar[PromptSet]
    PROMPT_SET_INANIMATE: _ClassVar[PromptSet]
    PROMPT_SET_UNIVERSAL: _ClassVar[PromptSet]
    PROMPT_SET_SINGLE: _ClassVar[PromptSet]
    PROMPT_SET_CUSTOM: _ClassVar[PromptSet]

class LossVariant(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_VARIANT_UNSPECIFIED: _ClassVar[LossVariant]
    LOSS_VARIANT_REFERENCE: _ClassVar[LossVariant]
    LOSS_VARIANT_PAPER: _ClassVar[LossVariant]
PROMPT_SET_UNSPECIFIED: PromptSet
PROMPT_SET_ANIMATE: PromptSet
PROMPT_SET_INANIMATE: PromptSet
PROMPT_SET_UNIVERSAL: PromptSet
PROMPT_SET_SINGLE: PromptSet
PROMPT_SET_CUSTOM: PromptSet
LOSS_VARIANT_UNSPECIFIED: LossVariant
LOSS_VARIANT_REFERENCE: LossVariant
LOSS_VARIANT_PAPER: LossVariant

class ConceptRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("step_time", "eta")
    STEP_TIME_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    step_time: _duration_pb2.Duration
    eta: _duration_pb2.Duration
    def __init__(self, step_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
