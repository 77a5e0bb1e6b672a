"""The S2D service as the gRPC server (Ray Serve's proxy) registers it, with a request decoder that
never fails: a GenerateRequest that does not parse (a string field that is not UTF-8, garbage or
truncated bytes) becomes an `Undecodable` naming the field, which the ingress answers with
INVALID_ARGUMENT. grpc's own decoder would end such a call with UNKNOWN ("Unexpected DecodeError").
Name `s2d.proto.servicer.add_S2DServicer_to_server` in `grpc_servicer_functions`."""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from s2d.proto import s2d_pb2 as pb


@dataclass
class Undecodable:
    field: str
    message: str


def lenient(message_cls):
    """A request decoder for `message_cls` that answers an Undecodable instead of raising."""

    def decode(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return find_bad_field(data, message_cls.DESCRIPTOR) or Undecodable(
                "request", f"not a valid {message_cls.DESCRIPTOR.full_name} ({len(data)} bytes): {e}")

    return decode


decode_generate_request = lenient(pb.GenerateRequest)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise IndexError
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def find_bad_field(buf: bytes, desc, prefix: str = "") -> Undecodable | None:
    """Walk the wire format to name the string field that is not UTF-8; None if none is found."""
    pos, seen = 0, {}
    try:
        while pos < len(buf):
            key, pos = _varint(buf, pos)
            wire = key & 7
            if wire == 0:
                _, pos = _varint(buf, pos)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                n, pos = _varint(buf, pos)
                chunk, pos = buf[pos:pos + n], pos + n
                f = desc.fields_by_number.get(key >> 3)
                if f is None:
                    continue
                i = seen[f.name] = seen.get(f.name, -1) + 1
                name = f"{prefix}{f.name}" + (f".{i}" if f.is_repeated else "")
                if f.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError as e:
                        return Undecodable(name, f"not valid UTF-8 (byte {e.start})")
                elif f.type == FieldDescriptor.TYPE_MESSAGE:
                    bad = find_bad_field(chunk, f.message_type, name + ".")
                    if bad:
                        return bad
            else:
                return None
    except IndexError:
        return None
    return None


def add_S2DServicer_to_server(servicer, server):
    decode = decode_generate_request
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=decode, response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=decode,
            response_serializer=pb.GenerateChunk.SerializeToString),
        "ListTargets": grpc.unary_unary_rpc_method_handler(
            servicer.ListTargets, request_deserializer=lenient(pb.ListTargetsRequest),
            response_serializer=pb.ListTargetsResponse.SerializeToString),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=lenient(pb.HealthRequest),
            response_serializer=pb.HealthResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("s2d.v1.S2D", handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers("s2d.v1.S2D", handlers)
