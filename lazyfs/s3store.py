"""The S3 store, through boto3 with the standard credential chain.

Any S3-compatible endpoint works through ``StoreOptions.endpoint_url`` (or the
``AWS_ENDPOINT_URL`` variable boto3 reads itself). botocore's own retries are
off so that one policy, ``lazyfs.store.retry``, governs every request.

botocore 1.36 and later add a CRC32 to every PUT and check one on every GET
(https://github.com/boto/boto3/issues/4392). Here they run only where an
operation requires them: chunks and indexes are named by their SHA-256 and
verified on read, so the CRC32 only costs CPU. Some S3-compatible servers,
such as Backblaze B2, also reject its ``x-amz-sdk-checksum-algorithm`` header.
"""

from __future__ import annotations

import boto3
import botocore.config
import botocore.exceptions

from .errors import BucketNotFound, ObjectNotFound, StoreError, StoreUnavailable
from .logutil import register_secret
from .store import (RESULT_ERROR, RESULT_NOT_FOUND, RESULT_OK, RESULT_UNAVAILABLE, Store,
                    StoreOptions, retry)

_TEMPORARY_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
    "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "503", "500", "502", "504",
}

_TRANSPORT_ERRORS = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
)


def _status(exc: botocore.exceptions.ClientError) -> int:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def _is_temporary(exc: Exception) -> bool:
    if isinstance(exc, _TRANSPORT_ERRORS):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = _status(exc)
        return code in _TEMPORARY_CODES or status == 429 or status >= 500
    return False


def _is_not_found(exc: botocore.exceptions.ClientError) -> bool:
    code = exc.response.get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound") or _status(exc) == 404


class S3Store(Store):
    """Objects in ``s3://bucket/prefix/<key>``."""

    def __init__(self, bucket: str, prefix: str, options: StoreOptions):
        super().__init__()
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.options = options
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        config = botocore.config.Config(
            connect_timeout=options.connect_timeout_s,
            read_timeout=options.read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=options.max_connections,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self._client = session.client(
            "s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config
        )
        _register_credentials(session)

    def _run(self, operation: str, key: str, call):
        self._count(operation)
        try:
            value = retry(operation, key, self.options, call, _is_temporary,
                          on_retry=lambda: self._count_retry(operation))
        except StoreUnavailable:
            self._count_result(operation, RESULT_UNAVAILABLE)
            raise
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                self._count_result(operation, RESULT_ERROR)
                raise BucketNotFound(self.bucket, self.url) from None
            if _is_not_found(exc):
                self._count_result(operation, RESULT_NOT_FOUND)
                raise ObjectNotFound(key) from None
            self._count_result(operation, RESULT_ERROR)
            raise StoreError(f"{operation} {key} in {self.url} failed: {exc}") from None
        except botocore.exceptions.BotoCoreError as exc:
            self._count_result(operation, RESULT_ERROR)
            raise StoreError(f"{operation} {key} in {self.url} failed: {exc}") from None
        self._count_result(operation, RESULT_OK)
        return value

    def get(self, key: str) -> bytes:
        def call():
            response = self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            # StreamingBody.read, unlike the urllib3 response that its context
            # manager returns, turns a timeout or a broken connection in the body
            # into a botocore error and checks the Content-Length.
            # TODO: a body that keeps trickling in without ever pausing for
            # read_timeout_s keeps this worker thread and a fetch slot until its end.
            body = response["Body"]
            try:
                return body.read()
            finally:
                body.close()

        return self._run("get", key, call)

    def put(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers see the old object or the new one.
        self._run("put", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self.prefix + key, Body=data))

    def exists(self, key: str) -> bool:
        def call():
            try:
                self._client.head_object(Bucket=self.bucket, Key=self.prefix + key)
                return True
            except botocore.exceptions.ClientError as exc:
                if _is_not_found(exc):
                    return False
                raise

        return self._run("head", key, call)

    def list(self, prefix: str) -> list[str]:
        def call():
            keys = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                keys.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
            return sorted(keys)

        return self._run("list", prefix, call)

    def close(self) -> None:
        self._client.close()


def _register_credentials(session: boto3.session.Session) -> None:
    """Keep the credentials boto3 resolved out of every log line (``lazyfs.logutil``)."""
    credentials = session.get_credentials()
    if credentials is None:
        return
    # NOTE: credentials that refresh (an instance role) are registered as they
    # are now; later ones rely on the pattern rules of lazyfs.logutil.
    frozen = credentials.get_frozen_credentials()
    for value in (frozen.access_key, frozen.secret_key, frozen.token):
        register_secret(value)
