"""The NFERD network: frozen teacher -> OCBE -> reverse student, with normal feature banks.

``ModelConfig`` holds every architectural choice (JSON-serialisable, saved with checkpoints).
With ``bank=False`` and ``fusion="none"`` the model is exactly RD4AD (Deng & Li, CVPR 2022):
same modules, same outputs, so the bank's gain is measured in one code base.

The banks' evidence enters in one of two places. By default it enters the anomaly map: each
position's distance to its nearest normal feature in a memory of every training position
(PatchCore's locally aware features, ``memory.py``) is added to the student's map, both
standardised on normal images. With a fusion module (the paper's design) the bank's recall at each
banked stage i (1 = finest) is fused into the map that enters the decoder stage rebuilding stage i.
Without a student (``student=False``) the memory alone scores, as PatchCore does. ``PRESETS`` names
the designs a user picks between.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import OptionError, option
from ..version import __version__
from .anomaly_map import COMBINES, GaussianBlur, anomaly_map, combine_stages, image_score
from .bank import BANKS, RECALLS, NormalFeatureBank, Recall
from .choices import DEFAULT_TEACHER, DISTANCES, PRESETS
from .coreset import GreedyCoreset
from .decoder import DeBasicBlock, DeBottleneck, ReverseDecoder
from .hafm import FUSIONS, make_fusion
from .limits import MAX_IMAGE_SIZE
from .loss import LOSSES
from .memory import MemoryBank
from .ocbe import OCBE
from .resnet import RESNET_SPECS, BasicBlock, Bottleneck
from .teacher import Teacher, build_teacher

LAST_VERSION_WITH_READINGS = "0.1.0"
# Options of earlier versions that no longer exist, with the value that behaves as today's model.
_LEGACY_NEUTRAL = {"weighting": "softmax", "patch_sampling": "random", "student_act": "auto", "student_width": None}
# What a saved config that lacks a field meant: the defaults of nferd 0.2.0 and earlier, whose
# default design fused the recall at every stage and had no bank distance in its map.
_SAVED_DEFAULTS = {"fusion": "hafm", "bank_stages": [1, 2, 3], "bank_distance_weight": 0.0, "search_reduction": 1,
                   "distance": "bank"}
DEFAULT_MEMORY_WEIGHT = 1.0
MIN_SEARCH_DIMS = 32  # fewer directions miss too many nearest keys (measured on 24 to 40 channels)


def config_from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    """Build a config dataclass from JSON, naming unknown keys instead of a TypeError."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} option(s): {', '.join(unknown)}")
    return cls(**d)


def upgrade_config(d: dict[str, Any]) -> dict[str, Any]:
    """A model config written by an earlier version, in today's terms; refused when it names a
    bank design that was removed (the message says which version still reads it)."""
    d = dict(d)
    removed = []
    reading = d.pop("reading", None)
    if reading is not None:
        if reading in ("E", "A"):
            d.setdefault("recall", "patch" if reading == "E" else "map")
        else:
            removed.append(f"bank reading '{reading}'")
    d.pop("rebuild_key_stages", None)  # used by reading G only
    if d.get("coreset", "greedy") == "greedy":  # the memory's one sampler, named in configs of 0.5.0 development runs
        d.pop("coreset", None)
    if not d.get("bank", True):
        d.setdefault("distance", "memory")  # irrelevant without a bank: today's default, so configs compare equal
    for key, value in _SAVED_DEFAULTS.items():
        d.setdefault(key, value)
    for key, neutral in _LEGACY_NEUTRAL.items():
        if key in d and d.pop(key) != neutral:
            removed.append(f"{key}")
    if removed and d.get("bank", True):
        raise ValueError(f"this model was trained with {', '.join(removed)}, which nferd {__version__} no longer has; "
                         f"nferd {LAST_VERSION_WITH_READINGS} is the last version that reads it "
                         f"(pip install nferd=={LAST_VERSION_WITH_READINGS}), or train it again")
    return d


@dataclass
class ModelConfig:
    """Architecture and scoring options; the defaults are the measured choices (``PRESETS``
    names the other designs).

    Args:
        teacher: frozen ImageNet backbone (``nferd.models.teacher.teacher_names()``).
        image_size: square input side in pixels, a multiple of 32.
        bank: normal feature banks on (NFERD) or off (RD4AD with ``fusion="none"``).
        recall: ``"patch"`` (each position recalls its nearest normal positions, keyed by the
            input's teacher features) or ``"map"`` (the paper's whole-map recall, keyed by the
            student's map).
        n_bank, top_k, temperature: bank images N, recalled entries K, softmax temperature.
        patch_limit: bank positions searched per bank by the patch recall (lower is cheaper).
        search_reduction: the bank distance's nearest-neighbour search first compares keys
            projected on C / ``search_reduction`` principal directions of the bank (at least
            32; teachers with fewer channels search exactly), then the exact cosines of 16
            candidates per position; 1 searches exactly. The default 4 is a fraction of the
            exact search's cost and scores as it does (docs/method.md, Table 8).
        fusion: ``hafm`` (channel and spatial attention in parallel), ``cbam`` (in series),
            ``add``, ``concat``, or ``none`` (RD4AD's student). Default: ``none``, or ``hafm``
            with the map recall.
        loss: ``flat`` (RD4AD's code) or ``pixel`` (the paper's per-position formula).
        map_combine: per-stage maps summed (RD4AD's evaluation) or multiplied.
        blur_sigma: Gaussian smoothing of the anomaly map, in pixels.
        bank_stages: teacher stages (1 = finest) that get a bank (and its fusion, if any).
            Default: 1, 2 when the bank scores through the map, else 1, 2, 3.
        bank_distance_weight: weight of the normal features' own evidence in the anomaly map:
            each position's distance to its nearest normal feature, added to the student's map
            after both are standardised on normal images; 0 turns it off. Default: 1 with no
            fusion (the student is then RD4AD's and the normal features only score), else 0.
        distance: where that distance looks: ``memory`` (every training position, PatchCore's
            locally aware features of ``memory_stages``, Euclidean) or ``bank`` (the N bank
            images' raw features of ``bank_stages``, cosine; nferd 0.3 and 0.4).
        student: train the reverse student (False: the memory alone scores, PatchCore).
        memory_stages: teacher stages (1 = finest) whose 3 x 3-averaged maps form a memory feature.
        memory_grid: the teacher stage whose grid the memory's features are on (finer stages
            averaged over its cells; None: the finest of ``memory_stages``). Stage 2's grid
            searches a quarter of stage 1's positions.
        memory_mib: size of the memory in MiB of fp32 features: every training position while they
            fit, else a coreset of as many as fit (the search's cost per position is bounded too).
    """

    teacher: str = DEFAULT_TEACHER
    image_size: int = 256
    bank: bool = True
    recall: str = "patch"
    n_bank: int = 64
    top_k: int = 4
    temperature: float = 0.01
    patch_limit: int = 16384
    search_reduction: int = 4
    fusion: str | None = None
    loss: str = "flat"
    map_combine: str = "sum"
    blur_sigma: float = 4.0
    bank_stages: tuple[int, ...] | None = None
    bank_distance_weight: float | None = None
    distance: str = "memory"
    student: bool = True
    memory_stages: tuple[int, ...] = (1, 2)
    memory_grid: int | None = 2
    memory_mib: float = 8.0

    def __post_init__(self) -> None:
        scores_by_map = self.bank and self.recall == "patch" and self.fusion in (None, "none")
        if self.fusion is None:  # the paper's recall only makes sense fused
            self.fusion = "hafm" if self.bank and self.recall == "map" else "none"
        if self.bank_stages is None:  # a fusion at every stage; the bank's distance at the two finest
            self.bank_stages = (1, 2) if scores_by_map and self.distance == "bank" else (1, 2, 3)
        if self.bank_distance_weight is None:
            self.bank_distance_weight = (DEFAULT_MEMORY_WEIGHT if self.distance == "memory" else 0.5) \
                if scores_by_map else 0.0

        def choose(name: str, value: str, choices: tuple[str, ...]) -> None:
            if value not in choices:
                raise ValueError(f"unknown {name} '{value}'; choose one of: {', '.join(choices)}")
        choose("recall", self.recall, RECALLS)
        choose("fusion", self.fusion, FUSIONS)
        choose("loss", self.loss, LOSSES)
        choose("map combine", self.map_combine, COMBINES)
        choose("distance", self.distance, DISTANCES)
        self.memory_stages = tuple(sorted({int(i) for i in self.memory_stages}))
        if not self.memory_stages or not set(self.memory_stages) <= {1, 2, 3}:
            raise ValueError(f"memory stages must be a non-empty subset of 1, 2, 3 (teacher stages, 1 = finest); "
                             f"got {self.memory_stages}")
        if self.memory_grid is not None and self.memory_grid not in (1, 2, 3):
            raise ValueError(f"memory grid must be a teacher stage 1, 2 or 3, got {self.memory_grid}")
        if not (0 < self.memory_mib < float("inf")):
            raise OptionError(f"{option('memory_mib')} must be a finite number > 0, got {self.memory_mib}")
        if not self.student and not (self.bank and self.distance == "memory" and self.fusion == "none"):
            raise OptionError(f"a model without a student scores with the memory alone: it needs {option('bank')} "
                              f"on, {option('distance')} memory and no {option('fusion')}")
        if self.image_size % 32 or not 64 <= self.image_size <= MAX_IMAGE_SIZE:
            raise OptionError(f"{option('image_size')} must be a multiple of 32 from 64 to {MAX_IMAGE_SIZE}, "
                              f"got {self.image_size}")
        if self.bank and not 1 <= self.top_k <= self.n_bank - 1:
            raise OptionError(f"{option('top_k')} must be from 1 to {option('n_bank')} - 1 = {self.n_bank - 1} (one "
                              f"bank image is masked out for its own image during training), got {self.top_k}")
        if self.temperature <= 0:
            raise OptionError(f"{option('temperature')} must be > 0, got {self.temperature}")
        if self.patch_limit < 1:
            raise OptionError(f"{option('patch_limit')} must be >= 1, got {self.patch_limit}")
        if self.search_reduction < 1:
            raise OptionError(f"{option('search_reduction')} must be >= 1 (1 = exact search), "
                              f"got {self.search_reduction}")
        if self.blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        if not (0 <= self.bank_distance_weight < float("inf")):
            raise OptionError(f"{option('bank_distance_weight')} must be a finite number >= 0, "
                              f"got {self.bank_distance_weight}")
        if self.bank_distance_weight > 0 and not (self.bank and self.recall == "patch"):
            raise OptionError(f"the bank distance in the map needs the bank with patch recall ({option('bank')} on, "
                              f"{option('recall')} patch)")
        if not self.bank and self.fusion != "none":
            raise OptionError(f"fusion '{self.fusion}' needs the bank: use {option('bank')} on, "
                              f"or {option('fusion')} none for RD4AD")
        if not self.uses_memory:  # options that do not apply take their defaults, so equal designs compare equal
            self.memory_stages, self.memory_grid, self.memory_mib = (1, 2), 2, 8.0
        self.bank_stages = tuple(sorted({int(i) for i in self.bank_stages}))  # JSON gives a list
        if not self.bank_stages or not set(self.bank_stages) <= {1, 2, 3}:
            raise ValueError(f"bank stages must be a non-empty subset of 1, 2, 3 (teacher stages, 1 = finest); "
                             f"got {self.bank_stages}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bank_stages"] = list(self.bank_stages)  # the JSON form, so saved and live configs compare equal
        d["memory_stages"] = list(self.memory_stages)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A saved config (checkpoint or result file), of this or an earlier version."""
        return config_from_dict(cls, upgrade_config(d), "model")

    def describe(self) -> str:
        """The design in a few words, for logs: RD4AD, or where NFERD's bank enters."""
        if not self.bank:
            return "RD4AD"
        stages = ",".join(map(str, self.bank_stages))
        memory = f"memory of every training position (stages {','.join(map(str, self.memory_stages))})"
        if not self.student:
            return f"memory bank alone (PatchCore): {memory}"
        if self.fusion == "none" and self.distance == "memory":
            return f"NFERD, distance to a {memory} in the map (weight {self.bank_distance_weight:g})"
        if self.fusion == "none":
            return f"NFERD, bank distance in the map (stages {stages}, weight {self.bank_distance_weight:g})"
        extra = f", bank distance weight {self.bank_distance_weight:g}" if self.bank_distance_weight else ""
        return f"NFERD, {self.recall} recall fused by {self.fusion} (stages {stages}{extra})"

    @property
    def memory_grid_stage(self) -> int:
        """The teacher stage whose grid the memory's features are on."""
        return self.memory_grid or self.memory_stages[0]

    @property
    def uses_memory(self) -> bool:
        """The map's distance looks in a memory of every training position."""
        return self.bank and self.distance == "memory" and (self.bank_distance_weight > 0 or not self.student)

    @property
    def student_recipe(self) -> dict[str, Any]:
        """What decides the student's trained weights: models with the same recipe (and training
        options and seed) train the same student, whatever scores beside it."""
        if not self.student or self.fusion != "none":
            return {}
        return {"teacher": self.teacher, "image_size": self.image_size, "loss": self.loss}

    @classmethod
    def preset(cls, name: str, **options: Any) -> ModelConfig:
        """The design ``name`` of ``PRESETS``, with ``options`` (teacher, image size, ...) on top."""
        if name not in PRESETS:
            raise OptionError(f"unknown model {option('preset')} '{name}'; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **options})


def search_dims(channels: int, reduction: int) -> int | None:
    """Directions of a bank's coarse search, or None for the exact search (also when the
    reduction would leave nearly every channel)."""
    dims = max(MIN_SEARCH_DIMS, channels // reduction)
    return dims if reduction > 1 and dims <= channels // 2 else None


@dataclass(frozen=True)
class StudentSpec:
    """Sizes of OCBE and decoder, derived from the teacher family."""

    enc_block: type[BasicBlock] | type[Bottleneck]
    dec_block: type[DeBasicBlock] | type[DeBottleneck]
    embed_planes: int
    ocbe_blocks: int
    layers: tuple[int, int, int]
    width: int


def student_spec(config: ModelConfig, stage_channels: tuple[int, int, int]) -> StudentSpec:
    """RD4AD's student for ResNets (WRN50-2-sized for every bottleneck teacher by default);
    a basic-block student sized from the stage channels for EfficientNet-Lite."""
    spec = RESNET_SPECS.get(config.teacher)
    if spec is not None and spec.block is Bottleneck:
        return StudentSpec(Bottleneck, DeBottleneck, 512, 3, (3, 4, 6), 128)
    if spec is not None:  # resnet18 / resnet34
        layers = (2, 2, 2) if spec.layers[0] == 2 else (3, 4, 6)
        return StudentSpec(BasicBlock, DeBasicBlock, 512, layers[0], layers, 64)
    return StudentSpec(BasicBlock, DeBasicBlock, 2 * stage_channels[2], 2, (2, 2, 2), 64)


class NFERD(nn.Module):
    """Teacher, OCBE, reverse student, normal feature banks and their fusion modules."""

    def __init__(self, config: ModelConfig, teacher: Teacher | None = None,
                 teacher_weights: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.teacher = teacher if teacher is not None else build_teacher(config.teacher, teacher_weights)
        c = self.teacher.stage_channels
        spec = student_spec(config, c)
        # a model without a student has none of its modules (OCBE, decoder, fusions)
        self.ocbe = OCBE(c, spec.enc_block, spec.embed_planes, spec.ocbe_blocks, spec.width) if config.student else None
        self.decoder = ReverseDecoder(self.ocbe.out_channels, c, spec.dec_block, spec.layers, spec.width,
                                      self.teacher.nonnegative) if config.student else None
        embed = self.ocbe.out_channels if config.student else spec.embed_planes * 4
        s = config.image_size
        # Bank i meets the map entering the decoder stage that rebuilds teacher stage i: the
        # student's rebuild of stage i + 1, or the OCBE embedding for the coarsest stage.
        targets = [(c[1], (s // 8, s // 8)), (c[2], (s // 16, s // 16)), (embed, (s // 32, s // 32))]
        # Keyed "0".."2" by teacher stage (state-dict keys banks.<i>.*).
        self.banks = nn.ModuleDict()
        # the N-image banks: fused into the student, or (distance "bank") searched by the map's distance
        needs_banks = config.fusion != "none" or (config.distance == "bank" and config.bank_distance_weight > 0)
        banked = [i for i in range(3) if config.bank and needs_banks and i + 1 in config.bank_stages]
        for i in banked:
            dims = search_dims(c[i], config.search_reduction) if config.bank_distance_weight > 0 else None
            extra = {"patch_limit": config.patch_limit, "search_dims": dims} if config.recall == "patch" else {}
            fused = targets[i][0] if config.fusion != "none" else None  # a bank that only scores needs no projection
            self.banks[str(i)] = BANKS[config.recall](config.n_bank, c[i], fused, targets[i][1],
                                                      config.top_k, config.temperature, **extra)
        self.fusions = nn.ModuleList([make_fusion(config.fusion if i in banked else "none", targets[i][0])
                                      for i in range(3)])
        self.memory = MemoryBank(sum(c[i - 1] for i in config.memory_stages), config.memory_stages,
                                 config.memory_grid) if config.uses_memory else None
        self.blur = GaussianBlur(config.blur_sigma)
        if config.bank_distance_weight > 0 and config.student:  # mean and std of the two terms' blurred maps on normals
            self.register_buffer("map_norm", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.last_recalls: list[Recall | None] = [None, None, None]

    # ----------------------------------------------------------------- banks
    @torch.no_grad()
    def fill_banks(self, teacher_maps: list[Tensor], ids: Tensor, memory: bool = True) -> None:
        """Store N teacher maps per stage (list of three N x C x H x W tensors) and their image ids, in
        the banks and (every position of them) in the memory."""
        for i, bank in self.banks.items():
            bank.fill(teacher_maps[int(i)].to(bank.maps.device), ids.to(bank.ids.device))
        if self.memory is not None and memory:
            grid = teacher_maps[self.config.memory_grid_stage - 1].shape
            self.fill_memory([(teacher_maps, ids)], grid[0] * grid[2] * grid[3])

    @torch.no_grad()
    def fill_memory(self, batches: Any, positions: int, seed: int = 0) -> None:
        """Fill the memory from ``batches`` ((three teacher maps, image ids) per batch, covering
        ``positions`` positions in all), thinned to ``memory_mib`` by PatchCore's greedy coreset."""
        from .memory import memory_rows
        rows = memory_rows(positions, self.memory.rows.shape[1], self.config.memory_mib)
        self.memory.fill(batches, rows, GreedyCoreset(seed=seed))

    def fuse(self, i: int, x: Tensor, teacher_feats: list[Tensor], exclude_ids: Tensor | None) -> Tensor:
        """The map ``x`` entering the decoder stage that rebuilds teacher stage ``i``, with the
        normal features recalled by bank ``i`` fused in (unchanged for a stage without a bank)."""
        if str(i) not in self.banks or self.config.fusion == "none":  # no fusion: the bank only scores
            return self.fusions[i](x)
        bank: NormalFeatureBank = self.banks[str(i)]
        recall = bank(teacher_feats[i] if bank.keyed_by_teacher else x, exclude_ids)
        self.last_recalls[i] = Recall(*(t.detach() for t in (recall.value, recall.similarity, recall.indices,
                                                              recall.weights)))  # for diagnostics only
        return self.fusions[i](x, recall.value.to(x.dtype))

    # --------------------------------------------------------------- forward
    def student_features(self, teacher_feats: list[Tensor], exclude_ids: Tensor | None = None) -> list[Tensor]:
        """The student's three maps, in teacher order, from the teacher's three maps.

        ``exclude_ids`` (training only): dataset indices of the batch, masked out of the banks.
        A model without a student returns no maps.
        """
        if self.ocbe is None:
            return []
        x = self.ocbe(teacher_feats)
        outs: list[Tensor] = [x, x, x]
        for j, stage in enumerate(self.decoder.stages):
            i = 2 - j
            x = stage(self.fuse(i, x, teacher_feats, exclude_ids))
            outs[i] = x
        return outs

    def forward(self, images: Tensor, exclude_ids: Tensor | None = None,
                teacher_feats: list[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Teacher and student maps. Pass cached ``teacher_feats`` to skip the teacher."""
        t = teacher_feats if teacher_feats is not None else self.teacher(images)
        return t, self.student_features(t, exclude_ids)

    def anomaly_maps(self, teacher_feats: list[Tensor], student_feats: list[Tensor],
                     size: tuple[int, int] | None = None, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Blurred anomaly maps (B x 1 x H x W) and image scores (B) from both feature lists.
        ``exclude``: image ids whose own memory rows are left out (leave-one-out scores of training images)."""
        size = size or (self.config.image_size, self.config.image_size)
        if not self.config.student:  # the memory alone, as PatchCore scores
            raw = self.bank_distance(teacher_feats, size, exclude)
        else:
            raw = anomaly_map(teacher_feats, student_feats, size, self.config.map_combine)
            if self.config.bank_distance_weight > 0:
                mu_s, sd_s, mu_d, sd_d = self.map_norm
                raw = (raw - mu_s) / sd_s + self.config.bank_distance_weight * (
                    self.bank_distance(teacher_feats, size, exclude) - mu_d) / sd_d
        maps = self.blur(raw)  # linear: standardising before or after the blur is the same
        return maps, image_score(maps)

    def bank_distance(self, teacher_feats: list[Tensor], size: tuple[int, int],
                      exclude: Tensor | None = None) -> Tensor:
        """Unblurred map at ``size`` of each position's distance to its nearest normal feature: in
        the memory, or summed over the banks."""
        if self.memory is not None:
            return combine_stages([self.memory.distance(teacher_feats, exclude)], size)
        return combine_stages([bank.nearest_distance(teacher_feats[int(i)]) for i, bank in self.banks.items()], size)

    @torch.no_grad()
    def term_maps(self, teacher_feats: list[Tensor], student_feats: list[Tensor],
                  size: tuple[int, int], exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The blurred student map and bank-distance map, unstandardised (for fitting ``map_norm``)."""
        s = self.blur(anomaly_map(teacher_feats, student_feats, size, self.config.map_combine))
        return s, self.blur(self.bank_distance(teacher_feats, size, exclude))

    # ---------------------------------------------------------------- counts
    def param_counts(self) -> dict[str, int]:
        def n(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"teacher": n(self.teacher), "ocbe": n(self.ocbe) if self.ocbe else 0,
                "decoder": n(self.decoder) if self.decoder else 0,
                "bank": n(self.banks), "fusion": n(self.fusions), "trainable": trainable,
                "bank_buffers": sum(b.maps.numel() for b in self.banks.values())
                + (self.memory.rows.numel() if self.memory is not None else 0)}
