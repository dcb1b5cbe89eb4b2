"""Raw CUDA sources of gpucnn's hand-written kernels (installed as gpucnn.kernels).

Each ``.cu`` file holds one pass and opens every kernel with a contract comment;
``gpucnn.cuda.loader`` reads, compiles and caches them.
"""
