"""The bytes of one server-to-client WebSocket text message, encoded once for every client.

The server negotiates no extension (no permessage-deflate) and a server's frames are not
masked, so a message's frame does not depend on the client it goes to: ``edge.broadcast``
frames each event once (``Frame.wire``) and every client's socket gets the same bytes.
"""

from __future__ import annotations

from typing import Final

from wsproto.frame_protocol import FrameProtocol

_FRAMER: Final = FrameProtocol(client=False, extensions=[])  # keeps no state across whole messages


def text_frame(text: str) -> bytes:
    """One whole, unmasked, uncompressed text message (RFC 6455 section 5.2)."""
    return bytes(_FRAMER.send_data(text, fin=True))
