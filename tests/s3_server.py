"""moto's S3 server on loopback for the store tests (no network, no cloud account)."""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

_COUNTER = itertools.count()
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "mergeline-test-key", "AWS_SECRET_ACCESS_KEY": "mergeline-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    url: str
    server: Any
    saved_env: dict[str, str | None] = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def bucket(self, stem: str = "mergeline") -> str:
        name = f"{stem}-{os.getpid()}-{next(_COUNTER)}"
        self.client().create_bucket(Bucket=name)
        return name

    def store_kwargs(self) -> dict[str, Any]:
        """ModelStoreResource fields pointing at this server."""
        return {"s3_endpoint_url": self.url, "s3_addressing_style": "path"}

    def stop(self) -> None:
        self.server.stop()
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_s3_server() -> S3Server:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server(url=f"http://{host}:{port}", server=server, saved_env=saved)
