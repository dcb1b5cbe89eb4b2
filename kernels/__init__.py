"""Raw CUDA sources of gpucnn's hand-written kernels (installed as gpucnn.kernels).

Each ``.cu`` file holds one pass and opens every kernel with a contract comment;
``.cuh`` headers hold device code several passes share (``activation.cuh``: the
activation rules).  ``gpucnn.cuda.sources`` reads the files and expands their
``#include "<header>.cuh"`` in place; ``gpucnn.cuda.loader`` compiles and caches
them.
"""
