"""Gallery backends: ``sqlite`` (an embedded store in one folder) and ``milvus`` (Milvus Lite or a
Milvus server); :mod:`bctkit.gallery.interface` picks one from the store string."""
