"""GatewayError: a failure of one request, carrying the gRPC status it maps to."""

import grpc


class GatewayError(Exception):
    """Base: translated to its status code in one place (service.py / client_stream.py)."""

    code = grpc.StatusCode.INTERNAL
    retry_after_ms = 0  # > 0: when the client may try again (RESOURCE_EXHAUSTED)

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidRequest(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class DuplicateRequest(GatewayError):
    code = grpc.StatusCode.ALREADY_EXISTS
