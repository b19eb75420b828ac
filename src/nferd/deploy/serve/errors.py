"""What goes wrong in the service, by name: a missing web stack, a rejected upload, a non-finite
model output, a client that has gone."""

from ...errors import MissingDependency, NferdError

CLIENT_GONE_STATUS = 499  # nginx's "client closed request"; nobody reads it, logs do


class MissingServeDependencies(MissingDependency):
    """fastapi / uvicorn / python-multipart are not installed."""


class ModelOutputError(NferdError, RuntimeError):
    """The model gave a NaN or infinite anomaly map or score: no decision may rest on it."""


class UploadRejected(Exception):
    """An uploaded file that cannot be scored; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class ClientGone(Exception):
    """The client disconnected: the rest of its request is not computed."""


def require_serve_dependencies() -> None:
    """Fail with the install command when the optional web stack is missing."""
    missing = []
    for mod, pkg in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart"),
                     ("prometheus_client", "prometheus-client")):
        try:
            __import__(mod)
        except ImportError:
            if mod == "python_multipart":
                try:  # older python-multipart releases are imported as `multipart`
                    __import__("multipart.multipart")
                    continue
                except ImportError:
                    pass
            missing.append(pkg)
    if missing:
        raise MissingServeDependencies(f"`nferd serve` needs {', '.join(missing)}: pip install 'nferd[serve]'")
