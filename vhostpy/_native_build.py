"""cffi builder of `vhostpy._native`, the compiled fast path (API mode, `set_source`).

Run by setuptools at install (`cffi_modules` in setup.py) or by hand with
`python vhostpy/_native_build.py`, which builds the extension next to this file. The C code
is `_fastpath.c` (rings, net, switch), `_fastpath_blk.c` (virtio-blk) and `_fastpath_net.c`
(the net polling loop);
`_fastpath.h` and `_fastpath_net.h` hold the declarations cffi parses (plain C only). This
module is never imported by the package at run time.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "_fastpath.h").read_text() + (HERE / "_fastpath_net.h").read_text())
ffibuilder.set_source(
    "vhostpy._native",
    '#include "_fastpath.h"\n#include "_fastpath_net.h"\n',
    sources=[str(Path("vhostpy") / "_fastpath.c"), str(Path("vhostpy") / "_fastpath_blk.c"),
             str(Path("vhostpy") / "_fastpath_net.c")],
    include_dirs=[str(Path("vhostpy"))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    import os
    import shutil

    os.chdir(HERE.parent)
    built = ffibuilder.compile(tmpdir="build/cffi", verbose=False)
    shutil.copy(built, HERE / Path(built).name)
