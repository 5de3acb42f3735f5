"""A real S3-compatible HTTP server for tests: moto's standalone server on 127.0.0.1, one per session."""

from __future__ import annotations

import io
import re
import secrets
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication
from moto.moto_server.werkzeug_app import create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

REGION = "us-east-1"
ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"  # moto takes any credentials


# S3's own answers when it will not take a write: (HTTP status, error code, message).
REFUSALS = {
    "SlowDown": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "AccessDenied": ("403 Forbidden", "AccessDenied", "Access Denied"),
}

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class RefusingWrites:
    """WSGI middleware before moto: while `refusing` names one of REFUSALS, every object write (a PUT
    or POST under a bucket: a whole object, a multipart upload and its parts) is answered with S3's
    error XML for it, as a bucket that is throttling or whose policy denies writes does. Reads,
    deletes and bucket calls go through, and every key a delete names (one DELETE, or a bulk delete's
    POST ?delete) is counted in `deleted` as "bucket/key", so a test can tell a key deleted twice."""

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]) -> None:
        self.app = app
        self.refusing: str | None = None
        self.refused = 0
        self.deleted: Counter[str] = Counter()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "").strip("/")
        self._count_deletes(environ, path)
        if self.refusing and environ["REQUEST_METHOD"] in ("PUT", "POST") and "/" in path:
            self.refused += 1
            status, code, message = REFUSALS[self.refusing]
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<Resource>/{path}</Resource><RequestId>{secrets.token_hex(8)}</RequestId></Error>"
            ).encode()
            start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)

    def _count_deletes(self, environ: dict[str, Any], path: str) -> None:
        method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        if method == "DELETE" and "/" in path:
            self.deleted[path] += 1
        elif method == "POST" and "/" not in path and "delete" in query.split("&"):
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)  # moto reads it again
            for key in re.findall(rb"<Key>(.*?)</Key>", body):
                self.deleted[f"{path}/{key.decode()}"] += 1


class _Server(ThreadedMotoServer):
    """moto's threaded server with RefusingWrites in front of its app."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.gate = RefusingWrites(DomainDispatcherApplication(create_backend_app))

    def _server_entry(self) -> None:
        self._server = make_server(self._ip_address, self._port, self.gate, True)
        self._server_ready_event.set()
        self._server.serve_forever()


class MotoS3:
    def __init__(self) -> None:
        self.server = _Server()

    def start(self) -> MotoS3:
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        import boto3

        self.client: Any = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        return self

    def stop(self) -> None:
        self.server.stop()

    def refuse_writes(self, refusal: str | None) -> None:
        """Answer every object write with REFUSALS[refusal] (None: take writes again)."""
        assert refusal is None or refusal in REFUSALS
        self.server.gate.refusing = refusal

    def deleted(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """How many times each key under `prefix` was named in a delete request (bulk or single)."""
        start = f"{bucket}/{prefix}"
        return {
            name.removeprefix(f"{bucket}/"): n
            for name, n in self.server.gate.deleted.items()
            if name.startswith(start)
        }

    def new_bucket(self, *, create: bool = True) -> str:
        name = f"media-{secrets.token_hex(6)}"
        if create:
            self.client.create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "", endpoint: str | None = None) -> dict[str, str]:
        """The receiver's environment for this bucket."""
        return {
            "RECEIVER_MEDIA_URL": f"s3://{bucket}" + (f"/{prefix}" if prefix else ""),
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every visible object under `prefix`, with its size."""
        listing = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return {item["Key"]: item["Size"] for item in listing.get("Contents", [])}

    def body(self, bucket: str, key: str) -> bytes:
        data: bytes = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return data

    def open_uploads(self, bucket: str) -> list[Any]:
        """Multipart uploads begun and neither completed nor aborted."""
        uploads: list[Any] = self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return uploads
