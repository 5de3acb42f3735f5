"""A real S3-compatible HTTP server for tests: moto's standalone server on 127.0.0.1, one per session."""

from __future__ import annotations

import secrets
from typing import Any

from moto.server import ThreadedMotoServer

REGION = "us-east-1"
ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"  # moto takes any credentials


class MotoS3:
    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

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
