"""One exception tree for modelpod. Every error knows how it maps onto HTTP, gRPC and exit codes.

    ModelpodError                      500 / INTERNAL          exit 1
    ├── UsageError                     400 / INVALID_ARGUMENT  exit 2   (bad CLI input, bad options)
    ├── MissingExtraError              500 / UNIMPLEMENTED     exit 2   (pip install 'modelpod[x]')
    ├── PodError                       400 / INVALID_ARGUMENT  exit 2
    │   ├── FrameworkError                                              (unknown / wrong framework)
    │   ├── SignatureError                                              (sample or tensor does not fit)
    │   ├── UnsafeModelError                                            (pickle without opt-in, bad imports)
    │   ├── IntegrityError                                              (digest mismatch; names the file)
    │   └── UnsafeArchiveError                                          (import: paths, links, bombs)
    ├── NotFoundError                  404 / NOT_FOUND         exit 2   (no such pod, model, version)
    ├── ConflictError                  409 / ALREADY_EXISTS    exit 2
    ├── InvalidRequestError            400 / INVALID_ARGUMENT  exit 2   (malformed inference request)
    │   ├── PayloadTooLargeError       413 / RESOURCE_EXHAUSTED
    │   └── ModelInputError                                             (the model raised on the client's input)
    ├── UnauthorizedError              401 / UNAUTHENTICATED   exit 2
    ├── ForbiddenError                 403 / PERMISSION_DENIED exit 2   (a foreign Origin/Host on management)
    ├── UnsupportedMediaTypeError      415 / INVALID_ARGUMENT  exit 2   (management bodies are JSON only)
    ├── ModelNotReadyError             503 / UNAVAILABLE       exit 1
    ├── OverloadedError                503 / UNAVAILABLE       exit 1   (carries Retry-After)
    ├── InferenceTimeoutError          504 / DEADLINE_EXCEEDED exit 1
    ├── InferenceError                 500 / INTERNAL          exit 1   (the model itself failed; a bug)
    ├── ImageError                     400 / FAILED_PRECONDITION exit 2 (base image, wheels, platform)
    ├── RegistryError                  502 / UNAVAILABLE       exit 2   (OCI registry unreachable / auth)
    ├── TrustError                     403 / PERMISSION_DENIED exit 2   (signatures, trust policy, encryption)
    │   ├── NotSignedError                                              (policy wants a signature; none there)
    │   ├── BadSignatureError                                           (tampered, truncated, another digest)
    │   ├── UntrustedSignerError                                        (a valid signature by an unknown key)
    │   ├── TrustKeyError                                               (a key file of the wrong type / unreadable)
    │   └── DecryptionError                                            (no key, or a wrong key, for encrypted weights)
    └── BatchError                     400 / FAILED_PRECONDITION exit 2 (batch input/output: names file and fix)
        └── TooManyErrorsError                                 exit 1   (more bad rows than --max-errors)
"""

from __future__ import annotations


class ModelpodError(Exception):
    """Base of every error modelpod raises on purpose."""

    http_status: int = 500
    grpc_code: str = "INTERNAL"  # a grpc.StatusCode name; grpc is an optional extra
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(ModelpodError):
    http_status, grpc_code, exit_code = 400, "INVALID_ARGUMENT", 2


class MissingExtraError(ModelpodError):
    """An optional dependency is not installed; the message names the extra."""

    http_status, grpc_code, exit_code = 500, "UNIMPLEMENTED", 2

    def __init__(self, extra: str, module: str, purpose: str = "") -> None:
        what = f" for {purpose}" if purpose else ""
        super().__init__(
            f"{module!r} is not installed{what}: pip install 'modelpod[{extra}]'"
        )
        self.extra = extra
        self.module = module


class PodError(ModelpodError):
    http_status, grpc_code, exit_code = 400, "INVALID_ARGUMENT", 2


class FrameworkError(PodError):
    pass


class SignatureError(PodError):
    pass


class UnsafeModelError(PodError):
    pass


class IntegrityError(PodError):
    """A file or manifest does not match its recorded digest."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class UnsafeArchiveError(PodError):
    pass


class NotFoundError(ModelpodError):
    http_status, grpc_code, exit_code = 404, "NOT_FOUND", 2


class ConflictError(ModelpodError):
    http_status, grpc_code, exit_code = 409, "ALREADY_EXISTS", 2


class InvalidRequestError(ModelpodError):
    http_status, grpc_code, exit_code = 400, "INVALID_ARGUMENT", 2


class PayloadTooLargeError(InvalidRequestError):
    http_status, grpc_code = 413, "RESOURCE_EXHAUSTED"


class ModelInputError(InvalidRequestError):
    """The model raised on the request's input (a bad index, ragged columns, NaN it refuses).

    Which model exceptions count as the client's is decided in one place:
    ``modelpod.serving.worker.model_error``.
    """


class UnauthorizedError(ModelpodError):
    http_status, grpc_code, exit_code = 401, "UNAUTHENTICATED", 2


class ForbiddenError(ModelpodError):
    http_status, grpc_code, exit_code = 403, "PERMISSION_DENIED", 2


class UnsupportedMediaTypeError(ModelpodError):
    http_status, grpc_code, exit_code = 415, "INVALID_ARGUMENT", 2


class ModelNotReadyError(ModelpodError):
    http_status, grpc_code = 503, "UNAVAILABLE"


class OverloadedError(ModelpodError):
    http_status, grpc_code = 503, "UNAVAILABLE"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InferenceTimeoutError(ModelpodError):
    http_status, grpc_code = 504, "DEADLINE_EXCEEDED"


class InferenceError(ModelpodError):
    """A failure that is not the client's. ``detail`` goes to the server log, never to the client."""

    http_status, grpc_code = 500, "INTERNAL"

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class ImageError(ModelpodError):
    http_status, grpc_code, exit_code = 400, "FAILED_PRECONDITION", 2


class RegistryError(ModelpodError):
    http_status, grpc_code, exit_code = 502, "UNAVAILABLE", 2


class TrustError(ModelpodError):
    """A pod or image is refused by the trust policy, or a key or signature is unusable."""

    http_status, grpc_code, exit_code = 403, "PERMISSION_DENIED", 2


class NotSignedError(TrustError):
    pass


class BadSignatureError(TrustError):
    pass


class UntrustedSignerError(TrustError):
    pass


class TrustKeyError(TrustError):
    pass


class DecryptionError(TrustError):
    pass


class BatchError(ModelpodError):
    """A batch job's input or output is unusable: unreadable file, missing column, output exists, disk full."""

    http_status, grpc_code, exit_code = 400, "FAILED_PRECONDITION", 2


class TooManyErrorsError(BatchError):
    exit_code = 1


class ClusterError(ModelpodError):
    """A Kubernetes cluster could not be reached, or refused what was sent; the message names what."""

    http_status, grpc_code, exit_code = 502, "UNAVAILABLE", 1
