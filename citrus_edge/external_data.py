"""Read and write ONNX initializers one at a time, external data through memory maps.

What the streaming graph rewriters (`compress.int4_awq`, `engines.float16.fp16_carrier_file`)
share: a graph over 2 GiB keeps its weights in one `<name>.onnx.data` file, and a rewrite must
never hold them all (the 8B's LLM graph is 30 GB in fp32). numpy + onnx only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from onnx import TensorProto, numpy_helper

CHUNK_BYTES = 256 * 2**20  # bytes read or converted at a time
NP_DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def external_info(tensor: TensorProto) -> dict[str, str]:
    """A tensor's external-data fields (location, offset, length)."""
    return {e.key: e.value for e in tensor.external_data}


class TensorReader:
    """Reads a graph's initializers one at a time (external data through a memory map)."""

    def __init__(self, graph: Path):
        self.base = graph.parent

    def array(self, tensor: TensorProto) -> np.ndarray:
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = external_info(tensor)
        dtype = NP_DTYPES.get(tensor.data_type)
        if dtype is None:
            return numpy_helper.to_array(tensor, base_dir=str(self.base))
        return np.memmap(
            self.base / info["location"],
            dtype=dtype,
            mode="r",
            offset=int(info.get("offset", 0)),
            shape=tuple(tensor.dims),
        )

    def raw_chunks(self, tensor: TensorProto) -> Iterator[bytes]:
        """The tensor's stored bytes, in chunks of at most CHUNK_BYTES."""
        if tensor.data_location != TensorProto.EXTERNAL:
            yield tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
            return
        info = external_info(tensor)
        offset, length = int(info.get("offset", 0)), int(info["length"])
        with open(self.base / info["location"], "rb") as f:
            f.seek(offset)
            while length > 0:
                chunk = f.read(min(length, CHUNK_BYTES))
                if not chunk:
                    raise ValueError(f"{tensor.name}: external data ends early")
                length -= len(chunk)
                yield chunk


class ExternalWriter:
    """Appends tensors' bytes to one external-data file and points each tensor at them."""

    ALIGN = 64

    def __init__(self, data_path: Path):
        self.path = data_path
        self.file = open(data_path, "wb")  # noqa: SIM115 (closed by close())
        self.offset = 0

    def put(self, tensor: TensorProto, chunks: Iterable[bytes]) -> None:
        pad = -self.offset % self.ALIGN
        self.file.write(b"\0" * pad)
        start = self.offset = self.offset + pad
        for chunk in chunks:
            self.file.write(chunk)
            self.offset += len(chunk)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.path.name),
            ("offset", str(start)),
            ("length", str(self.offset - start)),
        ):
            tensor.external_data.add(key=key, value=value)

    def close(self) -> None:
        self.file.close()
