# cython: language_level=3
"""whepfan's compiled core: per-packet, per-viewer work with no Python objects per packet.

Two halves, one extension module (so the fan-out loop calls SRTP as plain C):

* ``_srtp.pxi``   SRTP/SRTCP (RFC 3711, RFC 7714) on OpenSSL libcrypto EVP, and
                  the Python-facing ``SrtpSession``.
* ``_fanout.pxi`` ``Fanout``: per-viewer C structs, header rewriting, per-track
                  packet cache, batched ``sendmmsg``.

The C-level API shared by the halves is declared in ``_fastpath.pxd``; the Python
API in ``_fastpath.pyi``.
"""

include "_srtp.pxi"
include "_fanout.pxi"
include "_receiver.pxi"
