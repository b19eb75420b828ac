"""The service's limits: upload size, queue, batch, pixels, overlay size and image memory."""

from dataclasses import dataclass

MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers on top of the file bytes


@dataclass
class Limits:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_queue: int = 16
    max_batch_files: int = 16
    max_pixels: int = 25_000_000
    overlay_max_side: int = 1024
    max_image_memory_bytes: int = 1024 * 1024 * 1024

    def check(self) -> None:
        """ValueError unless the queue is >= 0 and every other limit > 0."""
        if self.max_queue < 0 or self.max_upload_bytes <= 0 or self.max_batch_files <= 0 or self.max_pixels <= 0 or \
                self.overlay_max_side <= 0 or self.max_image_memory_bytes <= 0:
            raise ValueError("max_queue must be >= 0 and max_upload_bytes, max_batch_files, max_pixels, "
                             "overlay_max_side, max_image_memory_bytes > 0")

    def max_files(self, path: str) -> int | None:
        """Files a path takes in one request; None for routes that take no body."""
        return {"/predict": 1, "/predict/batch": self.max_batch_files}.get(path)

    def body_limit(self, path: str) -> int | None:
        """Request-body limit for a path (the most it could ever accept); None for routes that take no body."""
        files = self.max_files(path)
        return None if files is None else files * (self.max_upload_bytes + MULTIPART_SLACK)
