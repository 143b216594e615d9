from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientMessage(_message.Message):
    __slots__ = ("open", "resume", "append", "cancel", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: Open
    resume: Resume
    append: Append
    cancel: Cancel
    close: Close
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., append: _Optional[_Union[Append, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Resume(_message.Message):
    __slots__ = ("session_id", "resume_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resume_token: str
    def __init__(self, session_id: _Optional[str] = ..., resume_token: _Optional[str] = ...) -> None: ...

class Append(_message.Message):
    __slots__ = ("text", "tokens", "chat", "generate", "score")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: TokenIds
    chat: ChatTurn
    generate: GenerationParams
    score: bool
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., chat: _Optional[_Union[ChatTurn, _Mapping]] = ..., generate: _Optional[_Union[GenerationParams, _Mapping]] = ..., score: _Optional[bool] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatTurn(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("opened", "tokens", "scores", "turn_end", "closed", "replica_id")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TURN_END_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    tokens: Tokens
    scores: Scores
    turn_end: TurnEnd
    closed: Closed
    replica_id: str
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., tokens: _Optional[_Union[Tokens, _Mapping]] = ..., scores: _Optional[_Union[Scores, _Mapping]] = ..., turn_end: _Optional[_Union[TurnEnd, _Mapping]] = ..., closed: _Optional[_Union[Closed, _Mapping]] = ..., replica_id: _Optional[str] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "resume_token", "replica_id", "sink_tokens", "window_tokens", "capacity", "stream_position", "resumed", "model", "rebuilt")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    SINK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    STREAM_POSITION_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REBUILT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resume_token: str
    replica_id: str
    sink_tokens: int
    window_tokens: int
    capacity: int
    stream_position: int
    resumed: bool
    model: str
    rebuilt: bool
    def __init__(self, session_id: _Optional[str] = ..., resume_token: _Optional[str] = ..., replica_id: _Optional[str] = ..., sink_tokens: _Optional[int] = ..., window_tokens: _Optional[int] = ..., capacity: _Optional[int] = ..., stream_position: _Optional[int] = ..., resumed: _Optional[bool] = ..., model: _Optional[str] = ..., rebuilt: _Optional[bool] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("ids", "text", "stream_position")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STREAM_POSITION_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    stream_position: int
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., stream_position: _Optional[int] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("logprobs", "first_position")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    first_position: int
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ..., first_position: _Optional[int] = ...) -> None: ...

class TurnEnd(_message.Message):
    __slots__ = ("reason", "input_tokens", "generated_tokens", "stream_position", "detail")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[TurnEnd.Reason]
        EOS: _ClassVar[TurnEnd.Reason]
        STOP: _ClassVar[TurnEnd.Reason]
        LENGTH: _ClassVar[TurnEnd.Reason]
        CANCELLED: _ClassVar[TurnEnd.Reason]
        APPENDED: _ClassVar[TurnEnd.Reason]
        CLOSED: _ClassVar[TurnEnd.Reason]
        REJECTED: _ClassVar[TurnEnd.Reason]
    REASON_UNSPECIFIED: TurnEnd.Reason
    EOS: TurnEnd.Reason
    STOP: TurnEnd.Reason
    LENGTH: TurnEnd.Reason
    CANCELLED: TurnEnd.Reason
    APPENDED: TurnEnd.Reason
    CLOSED: TurnEnd.Reason
    REJECTED: TurnEnd.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STREAM_POSITION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: TurnEnd.Reason
    input_tokens: int
    generated_tokens: int
    stream_position: int
    detail: str
    def __init__(self, reason: _Optional[_Union[TurnEnd.Reason, str]] = ..., input_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., stream_position: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class Closed(_message.Message):
    __slots__ = ("stream_position",)
    STREAM_POSITION_FIELD_NUMBER: _ClassVar[int]
    stream_position: int
    def __init__(self, stream_position: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("replicas", "sessions", "slots_total", "slots_used", "slots_free", "gateway_rss_bytes", "sessions_offloaded", "sessions_stored", "gateway_hostname", "gateway_pid", "store_rows", "store_bytes")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FREE_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OFFLOADED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_STORED_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_PID_FIELD_NUMBER: _ClassVar[int]
    STORE_ROWS_FIELD_NUMBER: _ClassVar[int]
    STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStats]
    sessions: int
    slots_total: int
    slots_used: int
    slots_free: int
    gateway_rss_bytes: int
    sessions_offloaded: int
    sessions_stored: int
    gateway_hostname: str
    gateway_pid: int
    store_rows: int
    store_bytes: int
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaStats, _Mapping]]] = ..., sessions: _Optional[int] = ..., slots_total: _Optional[int] = ..., slots_used: _Optional[int] = ..., slots_free: _Optional[int] = ..., gateway_rss_bytes: _Optional[int] = ..., sessions_offloaded: _Optional[int] = ..., sessions_stored: _Optional[int] = ..., gateway_hostname: _Optional[str] = ..., gateway_pid: _Optional[int] = ..., store_rows: _Optional[int] = ..., store_bytes: _Optional[int] = ...) -> None: ...

class ReplicaStats(_message.Message):
    __slots__ = ("replica_id", "sessions", "slots_total", "slots_used", "slots_free", "generated_tokens", "steps", "step_ms_p50", "kv_bytes", "device", "model", "process_rss_bytes", "decode_tokens", "prefill_tokens", "sessions_offloaded", "checkpoints_written", "checkpoint_failures", "draining", "hostname", "pid", "engine_pid", "sessions_by_key", "decode_held")
    class SessionsByKeyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FREE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_P50_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OFFLOADED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_PID_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_BY_KEY_FIELD_NUMBER: _ClassVar[int]
    DECODE_HELD_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    sessions: int
    slots_total: int
    slots_used: int
    slots_free: int
    generated_tokens: int
    steps: int
    step_ms_p50: float
    kv_bytes: int
    device: str
    model: str
    process_rss_bytes: int
    decode_tokens: int
    prefill_tokens: int
    sessions_offloaded: int
    checkpoints_written: int
    checkpoint_failures: int
    draining: bool
    hostname: str
    pid: int
    engine_pid: int
    sessions_by_key: _containers.ScalarMap[str, int]
    decode_held: int
    def __init__(self, replica_id: _Optional[str] = ..., sessions: _Optional[int] = ..., slots_total: _Optional[int] = ..., slots_used: _Optional[int] = ..., slots_free: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., step_ms_p50: _Optional[float] = ..., kv_bytes: _Optional[int] = ..., device: _Optional[str] = ..., model: _Optional[str] = ..., process_rss_bytes: _Optional[int] = ..., decode_tokens: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., sessions_offloaded: _Optional[int] = ..., checkpoints_written: _Optional[int] = ..., checkpoint_failures: _Optional[int] = ..., draining: _Optional[bool] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., engine_pid: _Optional[int] = ..., sessions_by_key: _Optional[_Mapping[str, int]] = ..., decode_held: _Optional[int] = ...) -> None: ...
