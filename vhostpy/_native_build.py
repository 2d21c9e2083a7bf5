"""cffi builder of `vhostpy._native`, the compiled fast path (API mode, `set_source`).

Run by setuptools at install (`cffi_modules` in setup.py) or by hand with
`python vhostpy/_native_build.py`, which builds the extension next to this file. The C code
is `_fastpath.c` (rings, net, switch), `_fastpath_packed.c` (packed rings), `_fastpath_blk.c`
(virtio-blk), `_fastpath_kick.c` (kicks served in C), `_fastpath_net.c` (the net polling
loop) and `_guard.c` (the SIGBUS guard over guest memory); the headers in `HEADERS` hold
the declarations cffi parses (plain C only). This module is never imported by the package at
run time.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent

#: The C files compiled into the extension, in the package directory.
SOURCES = ("_fastpath.c", "_fastpath_packed.c", "_fastpath_blk.c", "_fastpath_kick.c",
           "_fastpath_net.c", "_guard.c")
HEADERS = ("_fastpath.h", "_fastpath_packed.h", "_fastpath_kick.h", "_fastpath_net.h", "_guard.h")


def make_builder(package_dir: str) -> FFI:
    """The cffi builder with the C files under `package_dir`.

    setuptools wants paths relative to the project root ("vhostpy"); a build by hand passes
    the absolute directory, because cffi compiles from inside its temporary directory.
    """
    builder = FFI()
    builder.cdef("".join((HERE / h).read_text() for h in HEADERS))
    builder.set_source(
        "vhostpy._native",
        "".join(f'#include "{h}"\n' for h in HEADERS),
        sources=[str(Path(package_dir) / name) for name in SOURCES],
        include_dirs=[package_dir],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    )
    return builder


ffibuilder = make_builder("vhostpy")

if __name__ == "__main__":
    import shutil

    built = make_builder(str(HERE)).compile(tmpdir=str(HERE.parent / "build" / "cffi"),
                                            verbose=False)
    shutil.copy(built, HERE / Path(built).name)
