"""Build the compiled fan-out core; everything else lives in pyproject.toml.

WHEPFAN_DEBUG=1 builds with assertions, bounds checks and line tracing (for the
sanitizer/coverage runs); the default build is optimised.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("WHEPFAN_DEBUG") == "1"

extension = Extension(
    "whepfan._fastpath",
    sources=["whepfan/_fastpath.pyx"],
    libraries=["crypto"],  # OpenSSL libcrypto: EVP AES-CTR/GCM and HMAC-SHA1 for SRTP
    extra_compile_args=(["-O0", "-g"] if DEBUG else ["-O3"]) + ["-Wno-unused-function"],
    # SHA1_Init/Update/Final are deprecated in OpenSSL 3.0 but are the fastest way to
    # reuse precomputed HMAC inner/outer states without a per-packet allocation.
    define_macros=[("OPENSSL_SUPPRESS_DEPRECATED", None)]
    + ([("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []),
)

setup(
    ext_modules=cythonize(
        [extension],
        language_level=3,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "initializedcheck": DEBUG,
            "cdivision": True,
            "linetrace": DEBUG,
        },
    ),
)
