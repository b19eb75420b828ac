"""The network: frozen teachers, the one-class bottleneck, the reverse student, normal feature
banks and their fusion, the loss and the anomaly map, assembled in ``nferd.NFERD``."""
