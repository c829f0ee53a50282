"""GatewayError: why one call fails, and the one table that turns every failure into a status.

Whatever ends a call early says what happened (an `ErrorKind`, or a worker's `JobFailure`) and a
message naming the field or the cause; the status code it is answered with is chosen here and
nowhere else, for the call's status and for an in-band `Error` frame alike.
"""

import enum

import grpc

from protos import inference_pb2, jobs_pb2


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # a field of the request is wrong
    NOT_FOUND = "not found"  # an unknown model, or a cancel of no open request
    DUPLICATE = "duplicate"  # the request id is already open on this stream
    UNAUTHENTICATED = "unauthenticated"  # no valid API key
    FORBIDDEN = "forbidden"  # the key may not use that model
    OVERLOADED = "overloaded"  # a load limit: try again after the hint
    UNAVAILABLE = "unavailable"  # Redis unreachable, the job lost, the gateway stopping: retry
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    INTERNAL = "internal"


STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

JOB_FAILURES: dict[int, ErrorKind] = {
    jobs_pb2.JOB_FAILURE_INVALID: ErrorKind.INVALID,
    jobs_pb2.JOB_FAILURE_CANCELLED: ErrorKind.CANCELLED,
    jobs_pb2.JOB_FAILURE_DEADLINE: ErrorKind.DEADLINE,
    jobs_pb2.JOB_FAILURE_WORKERS_DIED: ErrorKind.INTERNAL,
}


class GatewayError(Exception):
    """A failure of one call; `retry_after_ms` > 0 says when the client may try again."""

    kind = ErrorKind.INTERNAL

    def __init__(self, message: str, kind: ErrorKind | None = None, retry_after_ms: int = 0):
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms
        if kind is not None:
            self.kind = kind

    @classmethod
    def of_failure(cls, chunk: jobs_pb2.TokenChunk) -> "GatewayError":
        """What a worker's failure chunk means for the call (a reason it does not know: INTERNAL)."""
        return cls(chunk.failure_message, JOB_FAILURES.get(chunk.failure, ErrorKind.INTERNAL))

    @property
    def code(self) -> grpc.StatusCode:
        return STATUS[self.kind]

    def to_proto(self) -> inference_pb2.Error:
        """The in-band form, for a GenerateStream frame."""
        return inference_pb2.Error(
            code=self.code.value[0], message=self.message, retry_after_ms=self.retry_after_ms
        )

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """The retry hint as gRPC retry policies read it."""
        return (("grpc-retry-pushback-ms", str(self.retry_after_ms)),) if self.retry_after_ms else ()


class InvalidRequest(GatewayError):
    kind = ErrorKind.INVALID


class Overloaded(GatewayError):
    kind = ErrorKind.OVERLOADED

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message, retry_after_ms=retry_after_ms)


class Unavailable(GatewayError):
    kind = ErrorKind.UNAVAILABLE
