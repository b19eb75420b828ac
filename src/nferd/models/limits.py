"""Bounds on a model's size that hold wherever a config comes from: an option, a checkpoint, a file.

No torch here, so the command line checks its options without loading the network.
"""

# The teacher downsamples by 32, so the side is a multiple of 32; every feature map, bank and anomaly
# map grows with its square, so the side is bounded: a typo or a tampered file fails when the config
# is read, not in a terabyte allocation.
MAX_IMAGE_SIZE = 4096
