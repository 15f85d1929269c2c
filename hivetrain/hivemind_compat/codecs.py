"""hivemind's 8-bit codec, fixed for NumPy 2 and installed into hivemind's codec table."""

from __future__ import annotations

import numpy as np
import torch
from hivemind.compression import Uniform8BitQuantization
from hivemind.compression import serialization as hivemind_serialization


class Uniform8Bit(Uniform8BitQuantization):
    """hivemind 1.1.12's 8-bit codec with its header read as a scalar.

    hivemind does ``int(np.frombuffer(buffer, count=1))``, which NumPy 2 refuses: every received
    part then fails with only a warning and each peer keeps its own values, so 8-bit averaging
    silently did not average. Encoding is hivemind's (the wire format is unchanged); decoding goes
    through hivemind's codec table, hence ``install_codecs``.
    """

    def extract(self, serialized_tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


def install_codecs() -> None:
    """Make hivemind decode 8-bit tensors with ``Uniform8Bit``; call before averagers fork (idempotent).

    The one process-wide write left in hivetrain/hivemind_compat/: hivemind decodes every received
    tensor through a module-level table chosen by the wire's compression type, with no per-averager
    door, so the fix cannot be per instance. It only changes how "8bit" (``UNIFORM_8BIT``, the wire
    format of ``hivetrain.protocol.training.COMPRESSIONS["8bit"]``) is read, to what hivemind meant.
    """
    if not isinstance(hivemind_serialization._BASE_COMPRESSION_TYPES.get("UNIFORM_8BIT"), Uniform8Bit):
        hivemind_serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()
