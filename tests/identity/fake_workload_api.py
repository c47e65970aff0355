"""A fake SPIFFE Workload API agent for the tests: a real grpc.aio server on a unix socket,
serving SVIDs issued by a development CA, with the standard's security-header check.

    async with FakeWorkloadApi(ca, socket_path, "spiffe://example.org/duragate") as agent:
        agent.address              # "unix:///.../agent.sock"
        await agent.rotate()       # a new X.509-SVID to every open FetchX509SVID stream
        await agent.break_streams()  # end every open stream with UNAVAILABLE
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identity.dev_ca import DevCA
from identity.workload import workload_pb2 as pb

HEADER = "workload.spiffe.io"


class FakeWorkloadApi:
    def __init__(self, ca: DevCA, socket_path: Path, spiffe_id: str, *, hint: str = "") -> None:
        self.ca = ca
        self.socket_path = socket_path
        self.spiffe_id = spiffe_id
        self.hint = hint
        self.address = f"unix://{socket_path}"
        self.x509_calls = 0
        self.jwt_calls = 0
        self.serials: list[int] = []
        self._generation = 0
        self._broken = 0
        self._changed = asyncio.Condition()
        self._response = self._issue()
        self._server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "SpiffeWorkloadAPI",
            {
                "FetchX509SVID": grpc.unary_stream_rpc_method_handler(
                    self._fetch_x509,
                    request_deserializer=pb.X509SVIDRequest.FromString,
                    response_serializer=pb.X509SVIDResponse.SerializeToString,
                ),
                "FetchJWTSVID": grpc.unary_unary_rpc_method_handler(
                    self._fetch_jwt,
                    request_deserializer=pb.JWTSVIDRequest.FromString,
                    response_serializer=pb.JWTSVIDResponse.SerializeToString,
                ),
                "FetchJWTBundles": grpc.unary_stream_rpc_method_handler(
                    self._fetch_jwt_bundles,
                    request_deserializer=pb.JWTBundlesRequest.FromString,
                    response_serializer=pb.JWTBundlesResponse.SerializeToString,
                ),
            },
        )
        self._server.add_generic_rpc_handlers((handler,))
        self._server.add_insecure_port(self.address)

    async def __aenter__(self) -> FakeWorkloadApi:
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(grace=None)

    def _issue(self) -> Any:
        cert, key = self.ca.issue_x509_svid(self.spiffe_id, timedelta(minutes=30))
        self.serials.append(cert.serial_number)
        svid = pb.X509SVID(
            spiffe_id=self.spiffe_id,
            x509_svid=_der([cert]),
            x509_svid_key=key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            bundle=_der(self.ca.x509_authorities),
            hint=self.hint,
        )
        return pb.X509SVIDResponse(svids=[svid])

    async def rotate(self) -> None:
        async with self._changed:
            self._response = self._issue()
            self._generation += 1
            self._changed.notify_all()

    async def break_streams(self) -> None:
        async with self._changed:
            self._broken += 1
            self._changed.notify_all()

    @staticmethod
    async def _check_header(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(HEADER) != "true":
            # The standard: a request without the security header is refused.
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request"
            )

    async def _fetch_x509(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await self._check_header(context)
        self.x509_calls += 1
        broken = self._broken
        sent = -1
        while True:
            async with self._changed:

                def changed(sent: int = sent) -> bool:
                    return self._generation != sent or self._broken != broken

                await self._changed.wait_for(changed)
                if self._broken != broken:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "agent restarting")
                sent, response = self._generation, self._response
            yield response

    async def _fetch_jwt(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._check_header(context)
        self.jwt_calls += 1
        if not request.audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        token = self.ca.issue_jwt_svid(self.spiffe_id, list(request.audience), timedelta(minutes=5))
        return pb.JWTSVIDResponse(
            svids=[pb.JWTSVID(spiffe_id=self.spiffe_id, svid=token, hint=self.hint)]
        )

    async def _fetch_jwt_bundles(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await self._check_header(context)
        document = json.dumps(self.ca.bundle()).encode()
        yield pb.JWTBundlesResponse(bundles={self.ca.trust_domain: document})


def _der(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)
