"""List the GPU code embedded in a CUDA binary (what `cuobjdump --list-elf/--list-ptx` shows), without the CUDA
toolkit's binutils: walks the fat binaries (magic 0xBA55ED50) and prints each entry's kind and SM version.

    python tools/list_cubins.py src/convnet/_cuda*.so
"""
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
KINDS = {1: "PTX", 2: "SASS (cubin)"}


def entries(data: bytes):
    pos = 0
    while (pos := data.find(struct.pack("<I", FATBIN_MAGIC), pos)) >= 0:
        _, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        entry = pos + header_size
        end = entry + fat_size
        while entry < end:
            kind, _ver, entry_header, padded = struct.unpack_from("<HHIQ", data, entry)
            sm = struct.unpack_from("<I", data, entry + 28)[0]
            if kind in KINDS:
                yield KINDS[kind], sm
            if entry_header == 0:
                break
            entry += entry_header + padded
        pos = max(end, pos + 4)


def main(paths):
    found = False
    for path in paths:
        data = open(path, "rb").read()
        seen = sorted(set(entries(data)), key=lambda e: (e[1], e[0]))
        for kind, sm in seen:
            print(f"{path}: {kind} sm_{sm}")
            found = True
    if not found:
        print("no CUDA fat binary found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
