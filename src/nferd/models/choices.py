"""The names a model configuration chooses from, and the presets built of them.

Plain data without torch: the command line lists and checks them before the network is loaded
(``nferd --help`` answers in well under a second). The modules that implement each choice import
their names from here and assert, when they load, that their registries match.
"""

from __future__ import annotations

from typing import Any

TEACHER_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                 "wide_resnet101_2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
DEFAULT_TEACHER = "efficientnet_lite0"
FUSIONS = ("hafm", "cbam", "add", "concat", "none")
RECALLS = ("patch", "map")
DISTANCES = ("memory", "bank")
LR_SCHEDULES = ("constant", "cosine")

# The designs a user chooses between, as the ModelConfig fields that pick them.
PRESETS: dict[str, dict[str, Any]] = {
    # RD4AD's student; the distance to the nearest normal feature of every training position (stages 1 and 2 on
    # stage 2's grid) added to its map.
    "nferd": {},
    # The memory of every training position alone, no student (PatchCore on the same teacher).
    "patchcore": {"student": False},
    # RD4AD's student; the nearest-normal distance in 64 bank images' raw stage 1 and 2 features (nferd 0.3-0.4).
    "nferd_bankdist": {"distance": "bank"},
    # The recall fused into the student at every stage by HAFM, keyed per position.
    "nferd_fusion": {"fusion": "hafm"},
    # The paper as written: whole-map recall keyed by the student's map, fused by HAFM.
    "nferd_paper": {"recall": "map"},
    # RD4AD (Deng & Li, CVPR 2022) in the same code: no bank.
    "rd4ad": {"bank": False},
}
