"""Build the compiled fan-out core; everything else lives in pyproject.toml.

WHEPFAN_DEBUG=1 builds with assertions, bounds checks and line tracing (for the
sanitizer/coverage runs); the default build is optimised.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("WHEPFAN_DEBUG") == "1"


def use_ipsec_mb() -> bool:
    """AES-GCM through intel-ipsec-mb (whepfan/includes/gcm_mb.h says why) when its header
    is installed (Debian: libipsec-mb-dev, x86-64 only). WHEPFAN_IPSEC_MB=0 builds
    without it, =1 fails the build if it is missing."""
    wanted = os.environ.get("WHEPFAN_IPSEC_MB", "auto")
    if wanted == "0":
        return False
    found = any(
        os.path.exists(os.path.join(folder, "intel-ipsec-mb.h"))
        for folder in ("/usr/include", "/usr/local/include")
    )
    if wanted == "1" and not found:
        raise SystemExit("WHEPFAN_IPSEC_MB=1 but intel-ipsec-mb.h is not installed")
    return found


IPSEC_MB = use_ipsec_mb()

extension = Extension(
    "whepfan._fastpath",
    sources=["whepfan/_fastpath.pyx"],
    include_dirs=["whepfan/includes"],
    # OpenSSL libcrypto: EVP AES-CTR/GCM and HMAC-SHA1 for SRTP; intel-ipsec-mb: AES-GCM
    libraries=["crypto"] + (["IPSec_MB"] if IPSEC_MB else []),
    extra_compile_args=(["-O0", "-g"] if DEBUG else ["-O3"]) + ["-Wno-unused-function"],
    # SHA1_Init/Update/Final are deprecated in OpenSSL 3.0 but are the fastest way to
    # reuse precomputed HMAC inner/outer states without a per-packet allocation.
    define_macros=[("OPENSSL_SUPPRESS_DEPRECATED", None)]
    + ([("WHEPFAN_IPSEC_MB", "1")] if IPSEC_MB else [])
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
