"""Analysis of stored results: statistics (``stats``), persona-vector geometry (``geometry``), the EM-match
classifier (``classifier``), figures (``figures``) and report building blocks (``reporting``, which reads stage
manifests and the cost model).

May import: shared.core, shared.contract
"""
