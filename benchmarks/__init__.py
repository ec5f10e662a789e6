"""minidiff against other engines on the same weights and inputs: minidiff.bench's ladder with peers.

    python benchmarks/vs_diffusers.py --config sd15 --size 256   (the flags of `minidiff bench`)

The library never imports these; they import the library (and the engines they compare with).
"""
